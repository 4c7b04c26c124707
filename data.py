"""
The task world: GSM-Infinite "medium", zero-context (STUDY.md §1), end to end in one file, in
pipeline order. Each section below starts with a numbered header; this docstring is its map.

1. The task world and its generator (STUDY.md §1)
     Template, TEMPLATES, MODES = (FORWARD, REVERSE), OP_MIN, OP_MAX, VMAX, P_FINAL_TOTAL, P_CLOSE
     REFERENCE_SIZES                    the original's per-op sizes (`python bench.py --only=sizes`)
2. Rendering and the gold graph
     generate(rng, op, template, mode)  one Problem with its gold graph, built directly at the requested op
     Problem (.to_row()), problem_id, graph_op, ref, lin
3. Solution parser, graph verifier and RL rewards (STUDY.md §2)
     parse_solution(text, mode)         a solution (gold or generated) -> graph keyed by parameter name
     verify(prediction, gold) -> Verdict, reward(verdict, kind), REWARDS, verify_rows(rows)
4. Mixtures, problem streams and evaluation sets (STUDY.md §4, §5)
     Mixture, mixture(...), parse_ops, MIXTURES, parse_mixture, ZOO, SCHOOL
     generate_problems(n, mixture, seed, workers, exclude_ids)   problem i depends only on (seed, i)
     make_eval_set(ops, n_per_op_per_template)                   the held-out problems
5. JSONL rows and training text
     read_jsonl, write_jsonl            released rows (problem, question, solution, op, id, template, mode)
     answer_of, prompt_text, training_text
                                        "<question> ... </question> <solution> ... </solution> <answer> N </answer>"
6. Tokenizer (STUDY.md §3)
     Tokenizer, train_tokenizer, tokenizer_identity, check_identity, SPECIAL_TOKENS, PAT_STR,
     MAX_INT_TOKEN, N_FIXED_TOKENS, DEFAULT_VOCAB_SIZE   (the original study's: interop.py)
7. Token shards, the shard loader and the loss mask (STUDY.md §4)
     write_shards, load_shard_meta, count_tokens, SHARD_FORMAT, ShardLoader, mask_question_targets
8. Dataset directories (what every training stage reads)
     build_dataset, load_eval_rows, standard_tokenizer, resolve_tokenizer
9. Command line
     COMMANDS (model.cli dispatches them), verify_main,
     SAMPLE_DEFAULTS, VERIFY_DEFAULTS, BUILD_DEFAULTS, TOKENIZER_DEFAULTS

The original generator (iGSM) draws a random graph and rejects it unless its op is the requested one
(~30 problems/s). We instead build the solution DAG at exactly the requested op, group by group (a
group = the items of one place, usually closed by the place's total, as in the original's output),
so only value-range failures are rejected (>1000 problems/s/core). Sizes (problem and solution
characters, statements, steps) are tuned to the original's per-op table. Where the original is
defective we differ on purpose (STUDY.md §1): no ill-posed reverse problems, stable content-hash
ids, a leaf's value is uniform in 1..4.

Commands (every option is --key=value; --help lists them with their defaults):
    python data.py sample --ops=2-20 --n=1000 --seed=0 --out=problems.jsonl [--templates=crazy_zootopia]
                          [--modes=normalforward] [--workers=2]     (or --mixture=headroom_.5/.3/.2)
    python data.py verify --in=ROWS.jsonl [--out=VERDICTS.jsonl]   # rows with "prediction" + "graph"/"solution"
    python data.py build --out=data_cache/base --mixture=2-10 --tokens=5e6 [--workers=2]   # a dataset directory
    python data.py tokenizer --out=tokenizer.json [--vocab_size=2816]                      # the standard tokenizer
Sizes and speed of the task world: `python bench.py --only=sizes,data`.
"""
import base64
import bisect
import collections
import functools
import hashlib
import itertools
import json
import os
import random
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import tiktoken
import torch

import model

# The original study's artifacts (format fixture, released config and tokenizer), copied into the repo
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference')
FIXTURE_PATH = os.path.join(REFERENCE_DIR, 'official_generator_samples.jsonl')


# -----------------------------------------------------------------------------
# 1. The task world and its generator (STUDY.md §1)
#
# Templates (spellings checked against the official samples), modes, the op range and the sizes
# of the original's output.

@dataclass(frozen=True)
class Template:
    name: str
    places: tuple          # two sub-lists of place names; one is chosen per problem
    items: tuple           # one or two sub-lists of item names; one is chosen per problem
    total: str             # the abstract parameter: "{total} in {place}"


TEMPLATES = {t.name: t for t in (
    Template('crazy_zootopia',
             (('Beverly Forest', 'Cedar Valley', 'Oakridge Riverside', 'Pine Ridge', 'Maple Creek'),
              ('South Zoo', 'Jefferson Circus', 'Mayer Aquarium', 'Bundle Ranch', 'Hamilton Farm')),
             (('adult bear', 'adult wolf', 'adult deer', 'adult fox', 'adult racoon'),
              ('adult eagle', 'adult parrot', 'adult owl', 'adult blue jay', 'adult crow')),
             'total number of adult animals'),
    Template('teachers_in_school',
             (('Evervale City', 'Hawkesbury', 'Glenfield City', 'Westhaven City', 'Brightford'),
              ('Riverton City', 'Clearwater Bay', 'Shoreline City', 'Oakbridge City', 'Ruby Bay')),
             (('elementary school', 'private middle school', 'public highschool', 'regional medical school',
               'culinarian school'),),
             'total number of schools'),
    Template('movie_festival_awards',
             (('Taylor Movie Festival', 'Verdi Movie Festival', 'West Sahara Movie Festival',
               'Northwood Movie Festival', 'Golden Banana Movie Festival'),
              ('Festival Lumière de Valmont', 'Rêves de Belleville', 'Cinéma de Montreval', 'Festival de Clairmont',
               'Festival de Saint-Rivage')),
             (('upbeat metropolis comedy', 'solemn period drama', 'futuristic sci-fi movie', 'calm road movie',
               'intense detective thriller'),),
             'total number of movies'),
)}
MODES = ('normalforward', 'forwardreverse')
FORWARD, REVERSE = MODES
OP_MIN, OP_MAX = 2, 40        # a solution uses at most op letters; 50 letters (no x/X in reverse) cap op at 50

# Sizes of the original's output (STUDY.md §1 table): op -> (forward problem chars, forward solution chars,
# forward steps, reverse solution chars). Used to tune the samplers below and printed by `stats`.
REFERENCE_SIZES = {
    2: (421, 142, 2.0, 484), 4: (546, 221, 3.0, 574), 6: (991, 306, 3.9, 664), 8: (855, 398, 5.0, 772),
    10: (611, 463, 5.5, 856), 12: (643, 528, 6.2, 942), 14: (784, 628, 7.4, 1040), 16: (854, 707, 8.1, 1132),
    18: (1039, 822, 9.6, 1266), 20: (994, 887, 10.2, 1311)}


# The generator.
#
# A solution is a sequence of groups; a group is 1-4 instance parameters "{item} in {place}" of one
# place, closed (usually) by that place's total, which sums exactly those items. The last node is
# the question: a total w.p. 0.9, as in the original. Each instance parameter has an op budget 1..4
# and a kind:
#   op 1: leaf "c"            | copy "P"
#   op 2: "c plus|times P"    | "the sum of A and B" | "the difference between A and B"
#   op 3: "c plus|times the sum of / difference between A and B" | "the sum of A, B, and C"
#   op 4: "c plus|times the sum of A, B, and C" | "the sum of A, B, C, and D"
# (kind = (number of parameter parents, has a constant, combine)). Every node except the last must
# feed a later node, so the whole solution is the question's ancestors; we track the "open" nodes
# that still need a consumer and let the next nodes take them first. Item parameters of a closed
# group need no other consumer (their total is one). The kind weights are the original's (counted
# on its output).

_KINDS = {1: (((0, False, 'sum'), .31), ((1, False, 'sum'), .69)),
          2: (((1, True, 'sum'), .80), ((2, False, 'sum'), .14), ((2, False, 'diff'), .06)),
          3: (((2, True, 'sum'), .50), ((2, True, 'diff'), .15), ((3, False, 'sum'), .35)),
          4: (((3, True, 'sum'), .56), ((4, False, 'sum'), .44))}
_OP_WEIGHTS = (.39, .31, .20, .09)          # op of an instance parameter (after the first, a leaf)
_ITEMS_WEIGHTS = (.38, .43, .17, .02)       # items per group (= op of its total)
P_FINAL_TOTAL = 0.9                         # the question asks for a total
P_CLOSE = 0.8                               # a non-final group is closed by its total
# target of the step sampler (tuned so the realised mean matches the original's forward steps);
# odd ops interpolate, beyond 20 extrapolate
_STEPS = {2: 2.0, 4: 2.8, 6: 3.45, 8: 4.9, 10: 5.25, 12: 5.92, 14: 7.22, 16: 7.92, 18: 9.6, 20: 10.1}
# mean number of noise statements per op: tuned so problem characters follow the reference table
_NOISE = {2: 2.75, 4: 3.0, 6: 5.6, 8: 3.7, 10: 1.0, 12: 0.45, 14: 0.6, 16: 0.45, 18: 1.2, 20: 0.3}
# noise statement kinds: (parameter parents, has constant, weight); the original's output has ~40% constants
_NOISE_KINDS = ((0, True, .38), (1, False, .12), (1, True, .20), (2, False, .10), (2, True, .10),
                (3, False, .03), (3, True, .04), (4, False, .03))
_LETTERS = tuple('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz')
_LETTERS_REV = tuple(c for c in _LETTERS if c not in 'xX')   # x is the unknown in reverse mode
VMAX = 1000                                                  # values on the solution path lie in 1..VMAX


@dataclass(frozen=True)
class World:
    """How big a problem's world is: the places and items per sub-list that a problem may use (the
    paper's: 5 and 5) and a factor on the mean number of noise statements (the paper's: 1.0). op stays
    the difficulty axis and the grammar is unchanged; a smaller world only means fewer names and fewer
    distractor statements to search through. The tiny CPU study uses one (MIXTURES['tiny_*'])."""
    places: int = 5
    items: int = 5
    noise: float = 1.0

    def __post_init__(self):
        if not (1 <= self.places <= 5 and 1 <= self.items <= 5 and self.noise >= 0):
            raise ValueError(f'bad world {self}: places and items in 1..5, noise >= 0')


PAPER_WORLD = World()
# Named worlds (the `world` key of the stages). 'tiny': 3 places x 3 items and no distractor
# statements, for the tiny CPU study: its model could not find a 2-hop chain among the paper's
# distractors within its CPU budget (RESEARCH.md has the measurements).
WORLDS = {'paper': PAPER_WORLD, 'tiny': World(places=3, items=3, noise=0.0)}


def parse_world(s) -> World:
    """A World from a WORLDS name or 'places,items,noise' ('3,3,0.5')."""
    if isinstance(s, World):
        return s
    if s in WORLDS:
        return WORLDS[s]
    try:
        places, items, noise = str(s).split(',')
        return World(int(places), int(items), float(noise))
    except ValueError:
        raise ValueError(f"cannot read world {s!r}: name one of {', '.join(WORLDS)} or write 'places,items,noise' "
                         f"(e.g. '3,3,0.5')") from None


def _interp(table, op, extrapolate=True):
    keys = sorted(table)
    if op <= keys[0]:
        return table[keys[0]]
    if op >= keys[-1] and not extrapolate:
        return table[keys[-1]]
    if op >= keys[-1]:      # extrapolate with the slope of the last interval
        k0, k1 = keys[-2], keys[-1]
        return table[k1] + (op - k1) * (table[k1] - table[k0]) / (k1 - k0)
    for k0, k1 in zip(keys, keys[1:]):
        if k0 <= op <= k1:
            return table[k0] + (op - k0) * (table[k1] - table[k0]) / (k1 - k0)


class _Node:
    __slots__ = ('name', 'place', 'parents', 'const', 'comb', 'total', 'value', 'form', 'letter')

    def __init__(self, name, place, total=False):
        self.name, self.place, self.total = name, place, total
        self.parents, self.const, self.comb, self.value, self.form, self.letter = [], None, 'sum', 0, None, ''


def _pick(rng, weighted):
    """weighted: ((choice, weight), ...) -> a choice."""
    r = rng.random() * sum(w for _, w in weighted)
    for c, w in weighted:
        r -= w
        if r < 0:
            return c
    return weighted[-1][0]


def _combine(vals, comb):
    return vals[0] - vals[1] if comb == 'diff' else sum(vals)


def _apply(const, v):
    return v + const[1] if const[0] == '+' else v * const[1]


def _draw_const(rng):
    return ('+', rng.randint(1, 4)) if rng.random() < 0.5 else ('*', rng.randint(2, 4))


def _plan(rng, T, max_places=5, max_items=5):
    """Groups [(n_items, closed)] and per-instance op budgets whose ops sum to exactly T, or None."""
    sd = 0.3 + 0.05 * T
    N = max(2, min(T, round(rng.gauss(_interp(_STEPS, T), sd))))
    final_total = rng.random() < P_FINAL_TOTAL
    nf = min(1 + _pick(rng, tuple(enumerate(_ITEMS_WEIGHTS))), N - final_total)
    groups, left = [(nf, final_total)], N - nf - final_total
    while left > 0:
        n, closed = 1 + _pick(rng, tuple(enumerate(_ITEMS_WEIGHTS))), rng.random() < P_CLOSE
        if n + closed > left:
            n = left - closed
            if n < 1:
                n, closed = left, False
        groups.append((n, closed))
        left -= n + closed
    groups.reverse()
    if len(groups) > max_places or any(n > max_items for n, _ in groups):   # one place per group
        return None
    budget = T - sum(n for n, c in groups if c)
    caps, j = [], 0                           # an instance node at index j has at most j parents
    for n, c in groups:
        for _ in range(n):
            caps.append(min(4, j + 1))
            j += 1
        j += c
    if not len(caps) <= budget <= sum(caps):
        return None
    ops = [1] + [min(cap, 1 + _pick(rng, tuple(enumerate(_OP_WEIGHTS)))) for cap in caps[1:]]
    diff = budget - sum(ops)
    while diff:                                # nudge random nodes until the ops sum to the budget
        i = rng.randrange(1, len(ops)) if len(ops) > 1 else 0
        if diff > 0 and ops[i] < caps[i]:
            ops[i] += 1
            diff -= 1
        elif diff < 0 and ops[i] > 1:
            ops[i] -= 1
            diff += 1
    return groups, ops


def _define(rng, nd, c, E, opened, must_take_all):
    """Choose nd's kind for op c, its parents among nodes[0:E] (open ones first) and its constant.
    Returns False when the open nodes cannot all be consumed here."""
    kinds = [kw for kw in _KINDS[c] if kw[0][0] <= E]
    need = len(opened)
    if must_take_all:
        kinds = [kw for kw in kinds if kw[0][0] >= need]
        if not kinds:
            return False
    elif need:                                 # prefer a kind that consumes something
        kinds = [kw for kw in kinds if kw[0][0] > 0] or kinds
        if need >= 2:
            kmax = max(kw[0][0] for kw in kinds)
            kinds = [kw for kw in kinds if kw[0][0] == kmax]
    k, has_const, comb = _pick(rng, kinds)
    if k <= need:
        ps = rng.sample(opened, k) if k < need else list(opened)
    else:
        ps = list(opened)
    while len(ps) < k:
        p = rng.randrange(E)
        if p not in ps:
            ps.append(p)
    rng.shuffle(ps)
    nd.parents, nd.comb, nd.const = ps, comb, (_draw_const(rng) if has_const else None)
    return True


def _value(rng, nd, nodes):
    """Compute nd.value, fixing the order of a difference and the constant; False if no valid value."""
    if not nd.parents:
        nd.value = rng.randint(1, 4)
        return True
    vals = [nodes[p].value for p in nd.parents]
    if nd.comb == 'diff':
        if vals[0] == vals[1]:
            nd.comb = 'sum'                   # same op, still a valid kind
        elif vals[0] < vals[1]:
            nd.parents.reverse()
            vals.reverse()
    s = _combine(vals, nd.comb)
    if nd.const is None:
        nd.value = s
        return 1 <= s <= VMAX
    plain = {sum(vals), abs(vals[0] - vals[1])} if len(vals) == 2 else {sum(vals)}
    for const in (nd.const, _draw_const(rng), ('+', rng.randint(1, 4)), ('+', 1)):
        v = _apply(const, s)
        # a constant step must not look like a plain sum/difference of the same parents,
        # so that the op can be read back from the gold graph (graph_op)
        if v <= VMAX and v not in plain:
            nd.const, nd.value = const, v
            return True
    return False


def _forms(nodes, u):
    """Linear forms (a, b) = a*x + b with nodes[u] = x; None if a coefficient is negative or the
    question's coefficient is zero (x would not be recoverable, or printed as '-x')."""
    for j, nd in enumerate(nodes):
        if j == u:
            nd.form = (1, 0)
        elif not nd.parents:
            nd.form = (0, nd.value)
        else:
            fs = [nodes[p].form for p in nd.parents]
            if nd.comb == 'diff':
                a, b = fs[0][0] - fs[1][0], fs[0][1] - fs[1][1]
            else:
                a, b = sum(f[0] for f in fs), sum(f[1] for f in fs)
            if nd.const is not None:
                a, b = (a, b + nd.const[1]) if nd.const[0] == '+' else (a * nd.const[1], b * nd.const[1])
            if a < 0:
                return None
            nd.form = (a, b)
    return nodes[-1].form[0] > 0 or None


def _solution_dag(rng, T, tpl, mode, places, items):
    """The solution nodes in order (last = question), the closed places, unknown index; or None."""
    plan = _plan(rng, T, len(places), len(items))
    if plan is None:
        return None
    groups, ops = plan
    gplaces = rng.sample(places, len(groups))
    nodes, opened, closed, oi = [], [], set(), 0
    n_inst = len(ops)
    for g, ((n, is_closed), place) in enumerate(zip(groups, gplaces)):
        first = len(nodes)
        for item in rng.sample(items, n):
            nd = _Node(f'{item} in {place}', place)
            E = len(nodes)
            last_instance = oi == n_inst - 1
            if not _define(rng, nd, ops[oi], E, opened, last_instance):
                return None
            if not _value(rng, nd, nodes):
                return None
            taken = set(nd.parents)
            opened = [p for p in opened if p not in taken]
            if not is_closed:
                opened.append(E)
            nodes.append(nd)
            oi += 1
        if is_closed:
            tot = _Node(f'{tpl.total} in {place}', place, total=True)
            tot.parents = list(range(first, len(nodes)))
            rng.shuffle(tot.parents)
            tot.value = sum(nodes[p].value for p in tot.parents)
            if tot.value > VMAX:
                return None
            taken = set(tot.parents)
            opened = [p for p in opened if p not in taken]
            if g < len(groups) - 1:
                opened.append(len(nodes))
            nodes.append(tot)
            closed.add(place)
    if opened and opened != [len(nodes) - 1]:  # everything must feed the question
        return None
    unknown = None
    if mode == REVERSE:                        # the original takes the last leaf; try earlier ones too
        leaves = [j for j, nd in enumerate(nodes) if not nd.parents]
        for u in reversed(leaves):
            if _forms(nodes, u):
                unknown = u
                break
        if unknown is None:
            return None
    return nodes, closed, unknown


def _noise(rng, T, nodes, closed, places, items, tpl, scale=1.0):
    """Statements for other instance parameters (1-4 parents, anything computable; never on the
    solution path) and the totals of the places they complete. Returns the noise nodes."""
    used = {nd.name for nd in nodes}
    slots = [(i, p) for p in places if p not in closed for i in items if f'{i} in {p}' not in used]
    mean = scale * (_interp(_NOISE, T, extrapolate=False) + 0.5)     # scale: World.noise
    want = int(rng.expovariate(1.0 / mean)) if mean > 0 else 0
    if not slots or want <= 0:
        return []
    chosen = rng.sample(slots, min(want, len(slots)))
    remaining = {}
    for _, p in chosen:
        remaining[p] = remaining.get(p, 0) + 1
    pool = list(nodes)                         # what a noise statement may refer to
    members = {}                               # place -> its instance nodes (solution + noise)
    for nd in nodes:
        if not nd.total:
            members.setdefault(nd.place, []).append(nd)
    for p in places:                           # totals of unclosed places with no noise left to add
        if p not in closed and p in members and p not in remaining:
            pool.append(_total_node(tpl, p, members[p]))
    out = []
    weights = tuple(((k, c), w) for k, c, w in _NOISE_KINDS)
    for item, place in chosen:
        nd = _Node(f'{item} in {place}', place)
        for _ in range(3):                     # a few tries at a value in range, else a constant
            k, has_const = _pick(rng, weights)
            k = min(k, len(pool))
            nd.parents = rng.sample(pool, k) if k else []   # noise keeps node references, not indices
            nd.comb = 'diff' if k == 2 and rng.random() < 0.45 else 'sum'
            nd.const = _draw_const(rng) if has_const and k else None
            if k == 0:
                nd.value = rng.randint(1, 4)
                break
            vals = [q.value for q in nd.parents]
            if nd.comb == 'diff' and vals[0] <= vals[1]:
                nd.parents.reverse()
                vals.reverse()
                if vals[0] == vals[1]:
                    nd.comb = 'sum'
            v = _combine(vals, nd.comb)
            if nd.const is not None:
                v = _apply(nd.const, v)
            if 1 <= v <= VMAX:
                nd.value = v
                break
        else:
            nd.parents, nd.const, nd.value = [], None, rng.randint(1, 4)
        out.append(nd)
        pool.append(nd)
        members.setdefault(place, []).append(nd)
        remaining[place] -= 1
        if remaining[place] == 0:
            pool.append(_total_node(tpl, place, members[place]))
    return out


def _total_node(tpl, place, members):
    t = _Node(f'{tpl.total} in {place}', place, total=True)
    t.value = sum(m.value for m in members)
    return t


# -----------------------------------------------------------------------------
# 2. Rendering and the gold graph: problem statements, question, solution text

def ref(name):
    """How the problem text refers to a parameter."""
    return 'the ' + name if name.startswith(('total', 'average')) else 'the number of ' + name


def _rhs(names, const, comb, value):
    """Right-hand side of a statement "The number of P equals ..."."""
    k = len(names)
    if k == 0:
        return str(value)
    if k == 1:
        body = ref(names[0])
    elif k == 2:
        body = (f'the difference between {ref(names[0])} and {ref(names[1])}' if comb == 'diff'
                else f'the sum of {ref(names[0])} and {ref(names[1])}')
    else:
        body = 'the sum of ' + ', '.join(ref(n) for n in names[:-1]) + ', and ' + ref(names[-1])
    if const is None:
        return body
    return f"{const[1]} {'plus' if const[0] == '+' else 'times'} {body}"


def lin(a, b):
    """Print a*x + b as the original (sympy) does: 'x', '2*x', 'x + 4', '2*x - 3', '5'."""
    if a == 0:
        return str(b)
    ax = 'x' if a == 1 else ('-x' if a == -1 else f'{a}*x')
    if b == 0:
        return ax
    if a < 0:                                  # sympy puts a positive constant first ('4 - x')
        return f'{b} - {ax[1:]}' if b > 0 else f'{ax} - {-b}'
    return f'{ax} + {b}' if b > 0 else f'{ax} - {-b}'


def _solution_text(nodes, unknown, letters, reverse):
    """Gold solution, step formats exactly as in the original's output."""
    pop = letters.pop
    out = ['The question is difficult, so we use equations to solve it. '] if reverse else []
    if reverse:
        fmt = lambda nd: lin(*nd.form)
    else:
        fmt = lambda nd: str(nd.value)
    for j, nd in enumerate(nodes):
        if j == unknown:
            nd.letter = 'x'
            out.append(f"Define {nd.name} as x; we don't know its value yet but will find it out later. ")
            continue
        ps = [nodes[p] for p in nd.parents]
        k, const, clauses = len(ps), nd.const, []
        if k == 0:
            nd.letter = pop()
            out.append(f'Define {nd.name} as {nd.letter}; so {nd.letter} = {fmt(nd)}. ')
            continue
        # the parameter part: a copy, a+b / a-b, or a chain of partial sums through scratch letters
        if k == 1:
            if const is None:
                nd.letter = pop()
                clauses.append(f'{nd.letter} = {ps[0].letter} = {fmt(nd)}')
                out.append(f'Define {nd.name} as {nd.letter}; so {clauses[0]}. ')
                continue
            cur, cur_txt = pop(), fmt(ps[0])
            clauses.append(f'{cur} = {ps[0].letter} = {cur_txt}')
            a = ps[0].form if reverse else ps[0].value
        else:
            cur, cur_txt = ps[0].letter, fmt(ps[0])
            a = ps[0].form if reverse else ps[0].value
            for i in range(1, k):
                b = ps[i].form if reverse else ps[i].value
                new = pop() if (i < k - 1 or const is not None) else None
                if nd.comb == 'diff':
                    a = (a[0] - b[0], a[1] - b[1]) if reverse else a - b
                    nums = f'({cur_txt}) - ({fmt(ps[1])})' if reverse else f'{cur_txt} - {fmt(ps[1])}'
                    sym = f'{cur} - {ps[i].letter}'
                else:
                    a = (a[0] + b[0], a[1] + b[1]) if reverse else a + b
                    nums = f'{cur_txt} + {fmt(ps[i])}'
                    sym = f'{cur} + {ps[i].letter}'
                res = lin(*a) if reverse else str(a)
                if new is None:                # last step of a plain sum: the node itself
                    nd.letter = pop()
                    clauses.append(f'so {nd.letter} = {sym} = {nums} = {res}')
                else:
                    clauses.append(f'{new} = {sym} = {nums} = {res}')
                    cur, cur_txt = new, res
        if const is not None:                  # c plus|times the scratch letter
            nd.letter = pop()
            c = const[1]
            if const[0] == '+':
                nums = f'{c} + {cur_txt}'
                sym = f'{c} + {cur}'
            else:
                nums = f'({c}) * ({cur_txt})' if reverse else f'{c} * {cur_txt}'
                sym = f'{c} * {cur}'
            clauses.append(f'so {nd.letter} = {sym} = {nums} = {fmt(nd)}')
        out.append(f'Define {nd.name} as {nd.letter}; ' + '; '.join(clauses) + '. ')
    last = nodes[-1]
    if reverse:
        a, b = last.form
        v, x0 = last.value, nodes[unknown].value
        e = lin(a, b)
        out.append(f'We know {last.letter} = {v}, so we have {e} = {v} and we solve it through the following '
                   f'steps: Simplifying the equation: {e} = {v}. Move all terms to one side: {lin(a, b - v)} = 0. '
                   f'Isolate the term with x: {a}*x = {v - b}. Divide both sides by {a}: x = {v - b} / {a}. '
                   f'Solution: x = {x0}. Answer: {x0}.')
    else:
        out.append(f'Answer: {last.value}.')
    return ''.join(out)


def _question(name):
    if name.startswith('total'):
        return f'What is the {name}?'
    item, place = name.split(' in ', 1)
    return f'How many {item} does {place} have?'


def problem_id(problem, question):
    """Stable content hash of the text the model sees (sha1 of problem + question, 16 hex)."""
    return hashlib.sha1((problem + question).encode('utf-8')).hexdigest()[:16]


@dataclass
class Problem:
    problem: str
    question: str
    solution: str
    answer: int
    op: int
    template: str
    mode: str
    id: str
    graph: dict = field(repr=False)

    def to_row(self) -> dict:
        return {'problem': self.problem, 'question': self.question, 'solution': self.solution, 'op': self.op,
                'id': self.id, 'template': self.template, 'mode': self.mode, 'answer': self.answer,
                'graph': self.graph}


def _render(rng, T, tpl, mode, nodes, noise, unknown):
    reverse = mode == REVERSE
    statements = []
    for j, nd in enumerate(nodes):
        if nd.total:
            continue                           # totals are never stated, they are implied
        if j == unknown:
            statements.append(f'The number of {nd.name} exists, and its number is greater than 0')
        else:
            statements.append(f'The number of {nd.name} equals '
                              f'{_rhs([nodes[p].name for p in nd.parents], nd.const, nd.comb, nd.value)}')
    for nd in noise:
        statements.append(f'The number of {nd.name} equals '
                          f'{_rhs([q.name for q in nd.parents], nd.const, nd.comb, nd.value)}')
    last = nodes[-1]
    if reverse:                                # the observation that makes x recoverable
        statements.append(f'{ref(last.name)[0].upper()}{ref(last.name)[1:]} equals {last.value}')
    rng.shuffle(statements)
    problem = '. '.join(statements) + '. '
    question = _question(nodes[unknown].name if reverse else last.name)
    letters = list(_LETTERS_REV if reverse else _LETTERS)
    rng.shuffle(letters)
    solution = _solution_text(nodes, unknown, letters, reverse)
    gnodes = {nd.name: {'parents': sorted(nodes[p].name for p in nd.parents),
                        'value': list(nd.form) if reverse else nd.value} for nd in nodes}
    answer = nodes[unknown].value if reverse else last.value
    graph = {'mode': mode, 'order': [nd.name for nd in nodes], 'nodes': gnodes, 'answer': answer,
             'unknown': nodes[unknown].name if reverse else None,
             'known': {'name': last.name, 'value': last.value} if reverse else None}
    return Problem(problem, question, solution, answer, T, tpl.name, mode, problem_id(problem, question), graph)


def given_statements(problem: str) -> int:
    """How many statements a problem text gives (_render joins them with '. '), distractors included.
    In the tiny world this, more than op, is what a small model finds hard (RESEARCH.md)."""
    return max(1, problem.count('. '))


def generate(rng: random.Random, ops, template: str, mode: str, world: World = PAPER_WORLD) -> Problem:
    """One problem at op `ops` (an int, or a list: one is drawn uniformly), built from `rng` alone,
    in `world` (the paper's by default)."""
    if isinstance(ops, int):
        T = ops
    else:
        ops = list(ops)
        T = ops[rng.randrange(len(ops))]
    if not OP_MIN <= T <= OP_MAX:
        raise ValueError(f'op {T} is outside {OP_MIN}..{OP_MAX}')
    if template not in TEMPLATES:
        raise ValueError(f'unknown template {template!r}; choose from {", ".join(TEMPLATES)}')
    if mode not in MODES:
        raise ValueError(f'unknown mode {mode!r}; choose from {", ".join(MODES)}')
    tpl = TEMPLATES[template]
    for _ in range(10000):
        places = tpl.places[rng.randrange(len(tpl.places))][:world.places]
        items = tpl.items[rng.randrange(len(tpl.items))][:world.items]
        dag = _solution_dag(rng, T, tpl, mode, places, items)
        if dag is None:
            continue
        nodes, closed, unknown = dag
        noise = _noise(rng, T, nodes, closed, places, items, tpl, world.noise)
        return _render(rng, T, tpl, mode, nodes, noise, unknown)
    raise RuntimeError(f'could not generate a problem at op {T} ({template}, {mode})')


def graph_op(graph: dict) -> int:
    """op of a gold graph: sum over nodes of (parameter parents + 1 if a constant is involved).
    A node uses a constant iff its value is not a plain copy / sum / difference of its parents
    (the generator never emits a constant step that coincides with one)."""
    reverse = graph['mode'] == REVERSE
    nodes = graph['nodes']
    vec = (lambda v: tuple(v)) if reverse else (lambda v: (0, v))
    total = 0
    for name in graph['order']:
        nd = nodes[name]
        ps = [vec(nodes[p]['value']) for p in nd['parents']]
        v, k = vec(nd['value']), len(ps)
        if k == 0:
            total += 1
            continue
        s = (sum(p[0] for p in ps), sum(p[1] for p in ps))
        plain = {s}
        if k == 2:
            plain |= {(ps[0][0] - ps[1][0], ps[0][1] - ps[1][1]), (ps[1][0] - ps[0][0], ps[1][1] - ps[0][1])}
        total += k + (v not in plain)
    return total


# -----------------------------------------------------------------------------
# 3. Solution parser, graph verifier and RL rewards (STUDY.md §2)
#
# parse_solution(text) reads a solution (gold or generated, forward or reverse) into
# a graph keyed by parameter NAME; verify(prediction, gold_graph) compares it with the
# gold graph and returns a Verdict; reward(verdict, kind) turns that into an RL reward.
#
# How a solution is read (linear time, no regex backtracking, never eval):
# - Each "Define {name} as {L}; ..." step is one node. The step runs up to its first
#   "."; its clauses are separated by ";". The clause whose left side is L (usually
#   "so L = ...") defines the node (the last one wins; L always means the node inside
#   its own step); the others ("t = ...") define scratch letters.
# - A letter means its most recent definition (a Define or a scratch clause), looked
#   up in a table; letters are never guessed from single characters, so a consistent
#   renaming of the letters never changes a verdict. A scratch letter stands for the
#   parameters it was computed from, so "T = U + Y; p = T + u; so J = 2 * p" gives J
#   the parents [U, Y, u]. Constants are not parents. Undefined letters become the
#   parent "?L", which matches no gold parent.
# - Parents come from the first expression after "L =" (the symbolic one); the value
#   is the LAST expression of the clause, read as a linear form a*x + b with + - *,
#   parentheses and unary minus ("2*x + 4", "(2*x) - (x)", "(3) * (x + 1)", "-x + 3").
#   It need not be simplified: "= 3 + 2" reads as 5. Only the reverse unknown (the
#   letter of "Define ... as x; we don't know its value yet") may appear in a value.
#   In forward mode a value is an int; in reverse mode every value is [a, b], the
#   unknown being [1, 0] with no parents.
# - A name defined twice keeps its first definition; each redefinition counts as an
#   extra node.
#
# Two verdicts come out of one reading (a Verdict carries both):
# - lenient: each gold node has the right parents and the right final value, and (reverse)
#   the closing below has the gold equation and root. This is what the original study's
#   scorer judges; it never reads the numbers between the first and the last expression of
#   a clause, nor whether a scratch letter's value is right.
# - strict (perfect, correct, process_acc, the RL rewards): lenient, and every equality the
#   step writes is true. Each clause "L = e0 = e1 = ... = ek" is read with every letter
#   standing for the value its latest clause gave it (the last expression of that clause;
#   a Define's letter has no value until its own clause), and then
#     - each ei equals e(i+1) as a linear form (exact integers; a*x + b in reverse mode);
#     - where e(i+1) rewrites ei operand by operand (same operators at the top level,
#       e.g. "3 + l = 3 + 2", "x + D = x + x + 2", "3 * m = (3) * (x + 1)"), each operand
#       is replaced by an expression of its value: "l + m = 1 + 4" with l = 2, m = 3 is false
#       although the sums agree (_substitutes);
#     - a letter with no value yet (used before its clause) makes the step wrong.
#   A false equality in the node's own clause is an 'arithmetic' error of that node, one in
#   a scratch clause a 'scratch' error of the node whose step holds it, a letter with no
#   value an 'unassigned' error (ERROR_KINDS lists every kind; Verdict.errors gives each
#   wrong gold node its kinds). chain_errors counts the gold nodes that only the strict
#   check finds wrong (right parents and value, a false equality): "right values, false
#   arithmetic".
#
# Reverse mode also checks the closing ("We know L = v, so we have E = v and we solve
# it through the following steps: Simplifying the equation: ... Move all terms to one
# side: ... Isolate the term with x: ... Divide both sides by d: x = n / d. Solution:
# x = N."). It is correct iff L names the gold known parameter and v is its value, E
# equals that parameter's gold linear form, all five steps are present, each step's
# equation is linear in x with a non-zero x coefficient and the gold answer as its root
# (so each is equivalent to the gold equation), and the divisor d is the one on the
# right-hand side (the lenient closing, as the original judges it). The strict closing
# also asks each step to restate the one before it as the step says (_closing_chain_ok):
# Simplifying and Move keep lhs - rhs, Isolate writes it as c*x = n, Divide as
# x = n / c, Solution as x = N with N * c = n; "Isolate: 4*x = 8" after "Move: 2*x - 4 = 0"
# has the right root but is false. A wrong or missing closing is an ANSWER error
# (answer_error = True) even when the <answer> tag is right: it costs one error in the
# process reward and makes the sample not perfect; the outcome reward still reads only the tag.

REWARDS = ('outcome', 'blend_0.2_0.8', 'blend_0.5_0.5', 'strict')

_LIN_MAX_DIGITS = 30          # longer integer literals make a value unreadable (values here are < 10**6)
_LIN_MAX_ABS = 10 ** 30       # bound on coefficients while evaluating, so products cannot explode
_LIN_MAX_TOKENS = 512         # a value expression longer than this is unreadable (gold ones have < 30 tokens)
_LIN_MAX_CHARS = 4096         # ... and so is one longer than this many characters
_LIN_MAX_DEPTH = 32           # parenthesis nesting bound (gold uses 1)
_PARENTS_MAX = 256            # bound on a resolved parent list (gold nodes have < 25)
_EXPR_TOKEN_RE = re.compile(r'[0-9]+|[A-Za-z]+|\S')
_LETTER_RUN_RE = re.compile(r'[A-Za-z]+')
_ANSWER_LINE_RE = re.compile(r'Answer:\s*(-?[0-9]+)')
_UNKNOWN_MARK = 'know its value yet'
_CLOSING_STEPS = ('Simplifying', 'Move', 'Isolate', 'Divide', 'Solution')


def _parse_int(s):
    s = s.strip()
    body = s[1:] if s[:1] == '-' else s
    if not body or len(body) > _LIN_MAX_DIGITS or not (body.isascii() and body.isdigit()):
        return None
    return int(s)


def _linear_form(s, var):
    """The linear form (a, b) = a*var + b printed in s, or None if s is not one."""
    s = s.strip()
    if s.isdigit() and s.isascii() and len(s) <= _LIN_MAX_DIGITS:     # fast path: forward values
        return 0, int(s)
    if len(s) > 40:
        return _read_linear_form(s, var) if len(s) <= _LIN_MAX_CHARS else None
    return _short_linear_form(s, var)


@functools.lru_cache(maxsize=65536)
def _short_linear_form(s, var):
    """_read_linear_form, cached for short texts ("2*x + 4" recurs in every solution)."""
    return _read_linear_form(s, var)


def _read_linear_form(s, var):
    return _eval_tokens(_EXPR_TOKEN_RE.findall(s), var)


def _eval_tokens(toks, var, vals=None):
    """One pass over the tokens with an explicit stack for parentheses: + - * ( ), unary signs,
    integers, var, and (given vals, {letter: (a, b)}) letters standing for their values.
    Returns (a, b) or None (not a linear form, or a letter without a value)."""
    if len(toks) == 1:                 # fast path: most operands are one number or letter
        t = toks[0]
        if t[0] in '0123456789':
            return (0, int(t)) if len(t) <= _LIN_MAX_DIGITS else None
        return (1, 0) if t == var else (vals.get(t) if vals is not None else None)
    if not toks or len(toks) > _LIN_MAX_TOKENS:
        return None
    stack = []
    sa = sb = 0            # sum of the finished terms at this nesting level
    ta = tb = None         # product of the factors of the current term (None: no factor yet)
    sign = 1               # sign of the next factor
    operand = True         # expecting an operand (number, var, '(' or a unary sign)
    for t in toks:
        if operand:
            if t == '-':
                sign = -sign
                continue
            if t == '+':
                continue
            if t == '(':
                if len(stack) >= _LIN_MAX_DEPTH:
                    return None
                stack.append((sa, sb, ta, tb, sign))
                sa = sb = 0
                ta = tb = None
                sign = 1
                continue
            if t[0] in '0123456789':
                if len(t) > _LIN_MAX_DIGITS:
                    return None
                fa, fb = 0, sign * int(t)
            elif t == var:
                fa, fb = sign, 0
            elif vals is not None and t in vals:
                fa, fb = vals[t]
                fa, fb = sign * fa, sign * fb
            else:
                return None
            operand = False
        elif t == '*':
            operand = True
            continue
        elif t == '+' or t == '-':
            sa, sb = sa + ta, sb + tb
            ta = tb = None
            sign = 1 if t == '+' else -1
            operand = True
            continue
        elif t == ')' and stack:
            fa, fb = sa + ta, sb + tb
            sa, sb, ta, tb, sign = stack.pop()
            fa, fb = sign * fa, sign * fb
        else:
            return None
        sign = 1
        if ta is None:
            ta, tb = fa, fb
        else:
            if ta and fa:
                return None                 # x * x is not linear
            ta, tb = ta * fb + fa * tb, tb * fb
            if abs(ta) > _LIN_MAX_ABS or abs(tb) > _LIN_MAX_ABS:
                return None
    if operand or stack:
        return None
    return sa + ta, sb + tb


def _chain(parts, var, vals, lettered=False):
    """The strict reading of a clause's right side "e0 = e1 = ... = ek" (parts: the texts e0..ek), letters
    standing for their values in vals (lettered: e0 is known to have letters, so it is not read without). -> (the value of ek or None, its form read without letters or None
    (the lenient value), what is wrong: None, 'arithmetic' (two neighbours differ, an operand substituted
    with a wrong value, an unreadable part) or 'unassigned' (a letter without a value; it wins))."""
    prev = bad = None
    for text in parts:
        form = None if lettered else _linear_form(text, var)     # cached; None for a part with letters
        lettered = False
        if form is not None:
            cur = (form, None)
        else:
            toks = _EXPR_TOKEN_RE.findall(text) if len(text) <= _LIN_MAX_CHARS else []
            letters = [t for t in toks if t.isalpha() and t != var]
            if not letters or not all(t in vals for t in letters):
                bad, prev = ('unassigned' if letters else bad or 'arithmetic'), None
                continue
            cur = (None, toks)                         # its value is read when needed (_form)
        if prev is not None and not bad and not _equal(prev, cur, text, var, vals):
            bad = 'arithmetic'
        prev = cur
    if prev is None:
        return None, None, bad
    return _form(prev, var, vals), prev[0], bad


def _form(part, var, vals):
    """The value of a part (form, tokens) of _chain: its form, or its tokens read with the letters' values."""
    return part[0] if part[0] is not None else _eval_tokens(part[1], var, vals)


def _equal(a, b, b_text, var, vals):
    """Is "a = b" true, letters standing for their values in vals, with each operand of a replaced by its
    value where b rewrites a operand by operand? a, b: parts of _chain (b's text b_text)."""
    if a[1] is None:                                   # no letters in a: "3 + 2 = 5"
        return a[0] == _form(b, var, vals)
    ta = a[1]
    tb = b[1] if b[1] is not None else _EXPR_TOKEN_RE.findall(b_text)
    if len(ta) == len(tb):                             # the usual "3 + l = 3 + 2": token for token
        same = _token_for_token(ta, tb, var, vals)
        if same is not None:
            return same
    fa = _form(a, var, vals)
    return fa is not None and fa == _form(b, var, vals) and _substitutes(ta, tb, var, vals)


def _token_for_token(ta, tb, var, vals):
    """b (tokens tb) is a (tokens ta) with each letter replaced by one number, letter or the unknown: is every
    letter replaced by its value (then a = b holds)? None if b is not such a copy of a."""
    ok = True
    for x, y in zip(ta, tb):
        if x == y:
            continue
        if x not in vals:                               # a number, an operator or the unknown: must be as in a
            return None
        if y[0] in '0123456789':
            v = (0, int(y)) if len(y) <= _LIN_MAX_DIGITS else None
        else:
            v = (1, 0) if y == var else vals.get(y)
        if v is None:
            return None
        ok = ok and v == vals[x]
    return ok


_BINARY = frozenset('+-*')


def _top_split(toks):
    """Tokens split at their top-level binary operators -> (operands, operators), or None when the
    parentheses do not balance. An operator right after another one (or first) is a unary sign."""
    operands, ops, cur, depth = [], [], [], 0
    for t in toks:
        if t == '(':
            depth += 1
        elif t == ')':
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0 and t in _BINARY and cur and cur[-1] not in _BINARY:
            operands.append(tuple(cur))
            ops.append(t)
            cur = []
            continue
        cur.append(t)
    if depth or not cur:
        return None
    operands.append(tuple(cur))
    return tuple(operands), tuple(ops)


_SUBST_MAX_EXTRA = 3          # _substitutes reads operands of b with up to this many operators of their own


def _substitutes(ta, tb, var, vals):
    """Can b be cut into a's operands, each written as an expression of its value ("x + D" -> "x + x + 2" with
    D = x + 2; "3 * m" -> "(3) * (x + 1)")? The cuts are at top-level operators of b equal to a's, in order.
    True also when no cut gives a's shape at all ("l + m = 5"): then only the values, compared by the
    caller, count. ta, tb: the tokens of a and b; a's letters all have values."""
    sa, sb = _top_split(ta), _top_split(tb)
    if sa is None or sb is None:
        return True
    (a_operands, a_ops), (b_operands, b_ops) = sa, sb
    if not 0 <= len(b_ops) - len(a_ops) <= _SUBST_MAX_EXTRA or len(a_ops) > 6:
        return True             # b is no rewriting of a
    want = [_eval_tokens(o, var, vals) for o in a_operands]
    spans = {}

    def span(i, j):             # b's operands i..j with the operators between them
        if (i, j) not in spans:
            toks = list(b_operands[i])
            for k in range(i, j):
                toks += (b_ops[k],) + b_operands[k + 1]
            spans[i, j] = _eval_tokens(toks, var, vals)
        return spans[i, j]
    shaped = False
    for cuts in itertools.combinations(range(len(b_ops)), len(a_ops)):
        if any(b_ops[c] != op for c, op in zip(cuts, a_ops)):
            continue
        got = [span(i, j) for i, j in zip((0,) + tuple(c + 1 for c in cuts), cuts + (len(b_ops),))]
        if None not in got:
            if got == want:
                return True
            shaped = True
    return not shaped


def _extract_answer(text):
    """The answer inside <answer>...</answer>; without tags, the N of 'Answer: N'."""
    i = text.find('<answer>')
    if i >= 0:
        j = text.find('</answer>', i + 8)
        return None if j < 0 else _parse_int(text[i + 8:j])
    m = _ANSWER_LINE_RE.search(text)
    return _parse_int(m.group(1)) if m else None


class _ParsedSolution:
    __slots__ = ('nodes', 'order', 'duplicates', 'unknown', 'known', 'closing', 'answer', 'mode')


def _parse_text(text, mode=None):
    """Parse a solution text into _ParsedSolution (nodes: name -> (sorted parent tuple, (a, b) or None,
    frozenset of the strict error kinds its step's clauses have))."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode('utf-8', 'replace')
    elif not isinstance(text, str):
        text = '' if text is None else str(text)
    out = _ParsedSolution()
    out.answer = _extract_answer(text)
    cut = len(text)
    for tag in ('</solution>', '<answer>'):
        k = text.find(tag)
        if 0 <= k < cut:
            cut = k
    body = text[:cut]
    table = {}        # letter -> tuple of parameter names it stands for (one name for a node letter)
    vals = {}         # letter -> (a, b): the value its latest clause gave it (strict check)
    nodes, order, dup = {}, [], 0
    unknown = var = None
    starts = []
    k = body.find('Define ')
    while k >= 0:
        starts.append(k)
        k = body.find('Define ', k + 7)
    starts.append(len(body))
    for s0, s1 in zip(starts, starts[1:]):
        seg = body[s0 + 7:s1]
        semi = seg.find(';')
        if semi < 0:
            continue                       # truncated header: no node
        head = seg[:semi]
        k = head.rfind(' as ')
        letter = head[k + 4:].strip() if k >= 0 else ''
        if k < 0 or not (letter.isascii() and letter.isalpha()):
            continue
        name = head[:k].strip()
        rest = seg[semi + 1:]
        dot = rest.find('.')
        step = rest if dot < 0 else rest[:dot]
        table[letter] = (name,)
        vals.pop(letter, None)             # the node's letter has no value until its own clause
        parents, value, kinds = (), None, ()
        for clause in step.split(';'):
            if _UNKNOWN_MARK in clause:
                if unknown is None:
                    unknown, var, value = name, letter, (1, 0)
                continue
            parts = clause.split('=')
            if len(parts) < 2:
                continue
            lhs = parts[0].strip()
            if lhs[:3] == 'so ':
                lhs = lhs[3:].strip()
            if not lhs.isalpha():
                continue
            plist, lettered = [], False
            for tok in _LETTER_RUN_RE.findall(parts[1]):
                lettered = lettered or tok != var
                ref = table.get(tok)
                plist.extend(('?' + tok,) if ref is None else ref)
                if len(plist) > _PARENTS_MAX:
                    plist = ['?too many parents']
                    break
            got, plain, bad = _chain(parts[1:], var, vals, lettered)
            if lhs == letter:                # its value: the last expression, read without letters (lenient)
                parents, value = tuple(sorted(plist)), plain
            else:
                table[lhs] = tuple(plist)
                bad = 'scratch' if bad == 'arithmetic' else bad
            if bad:
                kinds += (bad,)
            if got is None:
                vals.pop(lhs, None)
            else:
                vals[lhs] = got
        if name in nodes:
            dup += 1
        else:
            nodes[name] = (parents, value, frozenset(kinds))
            order.append(name)
    out.nodes, out.order, out.duplicates, out.unknown = nodes, order, dup, unknown
    out.known = out.closing = None
    k = body.find('We know ')
    if k >= 0:
        out.known, out.closing = _parse_closing(body[k + 8:], table, var)
    out.mode = mode or (REVERSE if unknown is not None or out.known is not None else FORWARD)
    return out


def _parse_closing(s, table, var):
    """-> ({'name', 'value'} or None, {step: (lhs form, rhs form, divisor)} with key 'have' for 'so we have')."""
    comma = s.find(',')
    head = s if comma < 0 else s[:comma]
    parts = head.split('=')
    known = None
    if len(parts) == 2:
        ref = table.get(parts[0].strip())
        v = _parse_int(parts[1])
        if ref is not None and len(ref) == 1 and v is not None:
            known = {'name': ref[0], 'value': v}
    steps = {}
    i = s.find('so we have ')
    j = s.find(' and we solve it', i) if i >= 0 else -1
    if j >= 0:
        steps['have'] = _closing_equation(s[i + 11:j], var)
        k = s.find(':', j)
        rest = s[k + 1:] if k >= 0 else ''
        for sentence in rest.split('.'):
            label, colon, eq = sentence.partition(':')
            label = label.strip()
            if label.startswith('Answer') or not colon:
                break
            for step in _CLOSING_STEPS:
                if label.startswith(step) and step not in steps:
                    eqn = _closing_equation(eq, var)
                    if step == 'Divide' and eqn is not None:
                        eqn = eqn if eqn[2] == _parse_int(label.rpartition(' ')[2]) else None
                    steps[step] = eqn
    return known, steps


def _closing_equation(s, var):
    """'lhs = rhs' (rhs may be 'n / d' with constant d) -> (lhs form, rhs form, d or None), or None."""
    parts = s.split('=')
    if len(parts) != 2:
        return None
    lhs = _linear_form(parts[0], var)
    num, slash, den = parts[1].partition('/')
    rhs, d = _linear_form(num, var), None
    if slash:
        dd = _linear_form(den, var)
        if dd is None or dd[0] != 0 or dd[1] == 0:
            return None
        d = dd[1]
    if lhs is None or rhs is None:
        return None
    return lhs, rhs, d


def _difference(eqn):
    """lhs * d - rhs of an equation (lhs, rhs, d): the form that is 0 at its root."""
    (a1, b1), (a2, b2), d = eqn
    d = 1 if d is None else d
    return a1 * d - a2, b1 * d - b2


def _closing_chain_ok(closing):
    """Strict closing: each step restates the equation before it as the step says (section header)."""
    prev = _difference(closing['have'])
    for step in _CLOSING_STEPS:
        eqn = closing.get(step)
        if eqn is None:
            return False
        (a1, b1), (a2, _), d = eqn
        if step == 'Isolate' and (b1 or a2 or d is not None):          # c*x = n
            return False
        if step in ('Divide', 'Solution') and ((a1, b1) != (1, 0) or a2 or (d is None) != (step == 'Solution')):
            return False                                               # x = n / c, then x = N
        scale = closing['Divide'][2] if step == 'Solution' else 1       # N * c = n
        a, b = _difference(eqn)
        if (a * scale, b * scale) != prev:
            return False
        prev = a, b
    return True


def _has_root(eqn, answer):
    """Is eqn linear in x with a non-zero x coefficient and root x = answer?"""
    if eqn is None:
        return False
    a, b = _difference(eqn)
    return a != 0 and a * answer + b == 0


def _graph_dict(p):
    rev = p.mode == REVERSE
    answer = p.answer
    if answer is None and p.closing:      # reverse text without "Answer:" or tags: "Solution: x = N"
        sol = p.closing.get('Solution')
        if sol and sol[0] == (1, 0) and sol[1][0] == 0 and sol[2] is None:
            answer = sol[1][1]

    def val(v):
        if v is None:
            return None
        return [v[0], v[1]] if rev or v[0] else v[1]
    return {'mode': p.mode, 'order': list(p.order),
            'nodes': {n: {'parents': list(p.nodes[n][0]), 'value': val(p.nodes[n][1])} for n in p.order},
            'answer': answer, 'unknown': p.unknown, 'known': p.known}


def parse_solution(text, mode=None):
    """Graph dict (CONTRACT format) of a solution text, forward or reverse. Best effort; never raises.
    mode=None detects reverse mode from the unknown ("we don't know its value yet") or the closing."""
    return _graph_dict(_parse_text(text, mode))


# What can be wrong with a gold step: not defined; wrong parents; a wrong or an unreadable final value (the
# lenient kinds); a false equality in its own clause, a false equality in one of its scratch clauses, a
# letter used before it has a value (what the strict check adds).
ERROR_KINDS = ('missing', 'parents', 'value', 'unreadable', 'arithmetic', 'scratch', 'unassigned')
CHECKS = ('strict', 'lenient')


@dataclass
class Verdict:
    outcome: bool          # answer inside <answer>...</answer> (or "Answer: N." without tags) == gold answer
    answer: int | None     # the answer read from the prediction
    perfect: bool          # strict: every gold node correct, outcome, and (reverse) a correct closing
    process_acc: float     # strict: correct gold nodes / gold nodes
    n_gold: int
    correct: int           # gold nodes right under the strict check
    missing: int
    extra: int             # predicted nodes not in the gold graph, plus redefinitions
    value_errors: int      # gold nodes with a wrong or unreadable final value
    parent_errors: int
    answer_error: bool     # not outcome, or (reverse) a wrong/missing closing equation (strict)
    closing_ok: bool | None = None   # reverse: closing correct (strict); forward: None
    chain_errors: int = 0  # gold nodes with the right parents and value whose step writes a false equality
    lenient_perfect: bool = False              # the same, judged as the original's scorer does (lenient)
    lenient_closing_ok: bool | None = None
    errors: dict = field(default_factory=dict)  # gold node name -> its kinds (ERROR_KINDS), wrong nodes only

    @property
    def lenient_process_acc(self) -> float:
        return (self.correct + self.chain_errors) / self.n_gold if self.n_gold else 0.0

    def error_counts(self) -> dict:
        """{kind: gold steps with that kind} for every ERROR_KINDS kind, and 'closing': 1 for a wrong
        (strict) reverse closing."""
        out = dict.fromkeys(ERROR_KINDS, 0)
        for kinds in self.errors.values():
            for k in kinds:
                out[k] += 1
        out['closing'] = int(self.closing_ok is False)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _gold_view(gold):
    """(mode, {name: (sorted parents, (a, b))}, answer, known) of a gold graph (or of a problem row
    with "graph" or "solution"). A malformed gold graph is a ValueError: that is our bug, not the model's."""
    if isinstance(gold, dict) and 'nodes' not in gold:
        if gold.get('graph'):
            gold = gold['graph']
        elif isinstance(gold.get('solution'), str):
            gold = parse_solution(gold['solution'], gold.get('mode'))
    try:
        nodes = {}
        for name, g in gold['nodes'].items():
            v = g['value']
            if isinstance(v, bool) or not isinstance(v, (int, list, tuple)):
                raise TypeError(v)
            nodes[name] = (tuple(sorted(g['parents'])), (0, v) if isinstance(v, int) else (int(v[0]), int(v[1])))
        known = gold.get('known')
        if known is not None:
            known = (known['name'], int(known['value']))
        return gold.get('mode'), nodes, gold.get('answer'), known
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ValueError('verify: gold must be a graph dict {mode, order, nodes: {name: {parents, value}}, '
                         'answer, unknown, known} (or a row with "graph" or "solution"); failed on %r' % (e,)) from None


def _judge(p, view):
    """Compare a parsed prediction with a gold view: both verdicts (section header)."""
    mode, gnodes, answer, known = view
    n = len(gnodes)
    correct = missing = verr = perr = chain = 0
    errors = {}
    pnodes = p.nodes
    for name, (gp, gv) in gnodes.items():
        got = pnodes.get(name)
        if got is None:
            missing += 1
            errors[name] = ['missing']
            continue
        ps, pv, bad = got
        kinds = []
        if ps != gp:
            perr += 1
            kinds.append('parents')
        if pv != gv:
            verr += 1
            kinds.append('unreadable' if pv is None else 'value')
        if not kinds and not bad:
            correct += 1
            continue
        chain += not kinds                 # right parents and value, a false equality: strict only
        errors[name] = kinds + sorted(bad, key=ERROR_KINDS.index)
    extra = p.duplicates + sum(1 for name in pnodes if name not in gnodes)
    outcome = p.answer is not None and p.answer == answer
    lenient_closing = closing_ok = None
    if mode == REVERSE:
        lenient_closing = _check_closing(p, gnodes, answer, known)
        closing_ok = lenient_closing and _closing_chain_ok(p.closing)
    answer_error = not outcome or closing_ok is False
    return Verdict(outcome=outcome, answer=p.answer, perfect=n > 0 and correct == n and not answer_error,
                   process_acc=correct / n if n else 0.0, n_gold=n, correct=correct, missing=missing,
                   extra=extra, value_errors=verr, parent_errors=perr, answer_error=answer_error,
                   closing_ok=closing_ok, chain_errors=chain,
                   lenient_perfect=n > 0 and correct + chain == n and outcome and lenient_closing is not False,
                   lenient_closing_ok=lenient_closing, errors=errors)


def _check_closing(p, gnodes, answer, known):
    """The reverse closing, judged against the gold equation (see the header of this section)."""
    if known is None or known[0] not in gnodes or not p.closing or p.known != {'name': known[0], 'value': known[1]}:
        return False
    have = p.closing.get('have')
    if have is None or have[0] != gnodes[known[0]][1] or have[1] != (0, known[1]) or have[2] is not None:
        return False
    return all(_has_root(p.closing.get(step), answer) for step in _CLOSING_STEPS)


_verify_warned = False


def verify(prediction, gold, safe: bool = True) -> Verdict:
    """Verdict of a prediction (text after "<solution>", or a plain solution ending "Answer: N.")
    against a gold graph. Never evals; never raises on any prediction (a malformed GOLD graph is a
    ValueError). With safe=True an internal error scores the prediction as empty (a last line of
    defence for long RL runs); the fuzz tests pass safe=False so that any internal error is seen."""
    global _verify_warned
    view = _gold_view(gold)
    if not safe:
        return _judge(_parse_text(prediction, view[0]), view)
    try:
        return _judge(_parse_text(prediction, view[0]), view)
    except Exception as e:     # pragma: no cover - fuzz-tested not to happen
        if not _verify_warned:
            warnings.warn('verify: internal error %r; scoring the prediction as empty' % (e,))
            _verify_warned = True
        return _judge(_parse_text('', view[0]), view)


def reward(v: Verdict, kind: str, check: str = 'strict') -> float:
    """RL reward of a verdict. kind: 'outcome', 'process', 'blend_{w_a}_{w_p}' (forced to 0 when the
    outcome is 0), or 'strict' (= outcome * graph perfect). check: 'strict' (what RL uses) or 'lenient'
    (the original's scorer: parents and final values only, for comparison)."""
    if check not in CHECKS:
        raise ValueError('reward: unknown check %r; use one of %s' % (check, ', '.join(CHECKS)))
    strict = check == 'strict'
    if kind == 'outcome':
        return float(v.outcome)
    if kind == 'strict':
        return float(v.outcome and (v.perfect if strict else v.lenient_perfect))
    n = v.n_gold
    answer_error = v.answer_error if strict else not v.outcome or v.lenient_closing_ok is False
    errors = (v.value_errors + v.parent_errors + v.missing + min(v.extra, n) + int(answer_error)
              + (v.chain_errors if strict else 0))
    process = max(0.0, 1.0 - errors / n) if n else 0.0
    if kind == 'process':
        return process
    if kind.startswith('blend_'):
        try:
            w_a, w_p = (float(w) for w in kind[6:].split('_'))
        except ValueError:
            raise ValueError('reward: bad blend kind %r; use e.g. blend_0.2_0.8' % kind) from None
        return w_a * v.outcome + w_p * process if v.outcome else 0.0
    raise ValueError('reward: unknown kind %r; use one of %s or process' % (kind, ', '.join(REWARDS)))


def verify_rows(rows):
    """Verify rows {graph or solution/mode, prediction, ...} -> (verdicts, summary of means)."""
    verdicts = []
    for i, row in enumerate(rows):
        where = 'row %d%s' % (i + 1, ' (id %s)' % row['id'] if isinstance(row, dict) and row.get('id') else '')
        if not isinstance(row, dict):
            raise ValueError('%s is not a JSON object; each line must be a problem row with a "prediction"' % where)
        pred = row.get('prediction')
        if not isinstance(pred, str):
            raise ValueError('%s has no "prediction" text; add "prediction": the model\'s solution '
                             '(the text after <solution>)' % where)
        if row.get('graph'):
            gold = row['graph']
        elif isinstance(row.get('solution'), str):
            gold = parse_solution(row['solution'], row.get('mode'))
            if gold['answer'] is None and row.get('answer') is not None:
                gold['answer'] = row['answer']
            if not gold['nodes']:
                raise ValueError('%s: no "Define ... as L;" step in its gold "solution"; give a "graph" '
                                 'or a gold solution text' % where)
        else:
            raise ValueError('%s has neither "graph" nor "solution"; add the gold graph or gold solution' % where)
        verdicts.append(verify(pred, gold))
    return verdicts, _verify_summary(verdicts, [r.get('mode') for r in rows])


def _verify_summary(verdicts, modes):
    def means(vs):
        n = len(vs)
        out = {'n': n}
        if not n:
            return out
        for key in ('outcome', 'perfect', 'lenient_perfect', 'process_acc', 'lenient_process_acc',
                    'value_errors', 'parent_errors', 'chain_errors', 'missing', 'extra', 'answer_error'):
            out[key] = sum(float(getattr(v, key)) for v in vs) / n
        for kind in REWARDS:
            out['reward_' + kind] = sum(reward(v, kind) for v in vs) / n
        return out
    summary = means(verdicts)
    by_mode = {}
    for v, m in zip(verdicts, modes):
        by_mode.setdefault(m or 'unknown', []).append(v)
    if len(by_mode) > 1:
        summary['by_mode'] = {m: means(vs) for m, vs in sorted(by_mode.items())}
    return summary


# -----------------------------------------------------------------------------
# 4. Mixtures, problem streams and evaluation sets (STUDY.md §4, §5)

@dataclass(frozen=True)
class Mixture:
    """A distribution over (op, template, mode).
    ops: ((weight, (op, ...)), ...): pick a pair by weight, then an op uniformly from its list.
    templates / modes: ((name, weight), ...); empty = uniform over all.
    template_ops: ((template, ops-like-above), ...): overrides `ops` for that template
                  (e.g. school only at op 2)."""
    ops: tuple
    templates: tuple = ()
    modes: tuple = ()
    template_ops: tuple = ()
    world: World = PAPER_WORLD          # the size of each problem's world

    def sample(self, rng):
        """(op, template, mode) for one problem."""
        template = _pick(rng, self.templates) if self.templates else rng.choice(tuple(TEMPLATES))
        ops = dict(self.template_ops).get(template, self.ops)
        oplist = _pick(rng, tuple((o, w) for w, o in ops))
        op = oplist[rng.randrange(len(oplist))]
        mode = _pick(rng, self.modes) if self.modes else MODES[rng.random() < 0.5]
        return op, template, mode

    def to_dict(self):
        return {'ops': [[w, list(o)] for w, o in self.ops], 'templates': dict(self.templates),
                'modes': dict(self.modes), 'template_ops': {t: [[w, list(o)] for w, o in ops]
                                                            for t, ops in self.template_ops},
                **({'world': asdict(self.world)} if self.world != PAPER_WORLD else {})}

    @classmethod
    def from_dict(cls, d):
        return mixture(d['ops'], d.get('templates') or None, d.get('modes') or None, d.get('template_ops') or None,
                       World(**d['world']) if d.get('world') else None)


def _norm_ops(ops):
    if isinstance(ops, str):
        return parse_ops(ops)
    if isinstance(ops, int):
        return ((1.0, (ops,)),)
    ops = list(ops)
    if ops and all(isinstance(o, int) for o in ops):       # a plain op list: uniform
        return ((1.0, tuple(ops)),)
    return tuple((float(w), tuple(int(o) for o in lst)) for w, lst in ops)


def mixture(ops, templates=None, modes=None, template_ops=None, world=None) -> Mixture:
    """Build a Mixture. ops: '2-10', '2-4:0.5,5-7:0.3,8-10:0.2', an op list, or [(weight, op list), ...].
    templates / modes: a dict of weights, a list (uniform) or None (all, uniform). world: a World
    (None: the paper's)."""
    def weights(x, universe, what):
        if x is None:
            return ()
        if isinstance(x, str):
            x = x.split(',')
        x = dict(x) if isinstance(x, dict) else {k: 1.0 for k in x}
        for k in x:
            if k not in universe:
                raise ValueError(f'unknown {what} {k!r}; choose from {", ".join(universe)}')
        if x and not any(w > 0 for w in x.values()):
            raise ValueError(f'every {what} weight is 0 in {x}; give at least one a positive weight')
        return tuple((k, float(w)) for k, w in x.items() if w > 0)
    tops = tuple((t, _norm_ops(o)) for t, o in (template_ops or {}).items())
    for t, _ in tops:
        weights([t], TEMPLATES, 'template')
    m = Mixture(_norm_ops(ops), weights(templates, TEMPLATES, 'template'), weights(modes, MODES, 'mode'), tops,
                world or PAPER_WORLD)
    for _, lst in m.ops + tuple(x for _, o in tops for x in o):
        for op in lst:
            if not OP_MIN <= op <= OP_MAX:
                raise ValueError(f'op {op} is outside {OP_MIN}..{OP_MAX}')
    return m


def parse_ops(s: str):
    """'2-10' -> ((1.0, (2..10)),); '2-4:0.5,5-7:0.3,8-10:0.2' -> weighted; '2-4,8' -> uniform over the union."""
    parts, weighted = [], []
    for part in str(s).replace(' ', '').split(','):
        if not part:
            continue
        rng_s, _, w = part.partition(':')
        lo, _, hi = rng_s.partition('-')
        try:
            lo, hi = int(lo), int(hi or lo)
            w = float(w) if w else None
        except ValueError:
            raise ValueError(f"cannot read ops {s!r}: write '2-10' or '2-4:0.5,5-7:0.3,8-10:0.2'") from None
        if lo > hi:
            raise ValueError(f'cannot read ops {s!r}: range {lo}-{hi} is empty')
        parts.append((w, tuple(range(lo, hi + 1))))
        weighted.append(w is not None)
    if not parts:
        raise ValueError(f"cannot read ops {s!r}: write '2-10' or '2-4:0.5,5-7:0.3,8-10:0.2'")
    if any(weighted) and not all(weighted):
        raise ValueError(f'cannot read ops {s!r}: give a weight to every range or to none')
    if all(weighted):
        return tuple((w, o) for w, o in parts)
    return ((1.0, tuple(sorted({op for _, o in parts for op in o}))),)


def _easy_medium_hard(e, m, h):
    return [(e, range(2, 5)), (m, range(5, 8)), (h, range(8, 11))]


ZOO, SCHOOL = 'crazy_zootopia', 'teachers_in_school'
MIXTURES = {
    # STUDY.md §4/§5.1: pre-training on op 2-10, and the headroom ablation (easy 2-4 / medium 5-7 / hard 8-10)
    'pretrain_uniform': mixture(range(2, 11)),
    'headroom_uniform': mixture(range(2, 11)),
    **{f'headroom_{a}/{b}/{c}': mixture(_easy_medium_hard(float(a), float(b), float(c)))
       for a, b, c in (('.5', '.3', '.2'), ('.2', '.3', '.5'), ('.4995', '.4995', '.001'), ('.495', '.495', '.01'),
                       ('.475', '.475', '.05'), ('.4', '.4', '.2'), ('.25', '.25', '.5'))},
    # STUDY.md §4: mid-training at the edge of competence
    'mid_11_14': mixture([(0.2, range(2, 11)), (0.8, range(11, 15))]),
    'mid_9_12': mixture([(0.2, range(2, 11)), (0.8, range(9, 13))]),
    # STUDY.md §5.1: RL ranges (uniform)
    'rl_7_10': mixture(range(7, 11)), 'rl_9_12': mixture(range(9, 13)),
    'rl_11_14': mixture(range(11, 15)), 'rl_17_20': mixture(range(17, 21)),
    # STUDY.md §4: evaluation bands
    'eval_all': mixture(range(2, 21)), 'eval_id': mixture(range(2, 11)),
    'eval_ood_edge': mixture(range(11, 15)), 'eval_ood_hard': mixture(range(15, 21)),
    # the tiny CPU study (runs/tiny.sh): the tiny world, forward mode only, in distribution op 2-4, edge op 5-6
    'tiny_pretrain': mixture(range(2, 5), modes=['normalforward'], world=WORLDS['tiny']),
    'tiny_mid': mixture([(0.2, range(2, 5)), (0.8, range(5, 7))], modes=['normalforward'], world=WORLDS['tiny']),
    # the same base with minimal exposure to the edge (STUDY.md §5.2's idea applied to op): 5% op 5-6
    'tiny_pretrain_exposure': mixture([(0.95, range(2, 5)), (0.05, range(5, 7))], modes=['normalforward'],
                                      world=WORLDS['tiny']),
}
# STUDY.md §5.2, contextual generalization. The release's main-text setting (its context_pretrain_2
# checkpoints): zoo at op 2-20 and school only at op 2 (the primitives), school at 10 / 1 / 0.1% of the problems.
for _name, _share in (('0.1pct', 0.001), ('1pct', 0.01), ('10pct', 0.1)):
    MIXTURES[f'ctx_main_school_{_name}'] = mixture(range(2, 21), {ZOO: 1 - _share, SCHOOL: _share},
                                                   template_ops={SCHOOL: [2]})
# Its appendix setting: zoo at op 2-10 with a school share (school at op 2-10), and school only at op 2.
for _name, _share in (('0pct', 0.0), ('0.1pct', 0.001), ('1pct', 0.01), ('5pct', 0.05), ('10pct', 0.1),
                      ('20pct', 0.2), ('50pct', 0.5)):
    MIXTURES[f'ctx_school_{_name}'] = mixture(range(2, 11), {ZOO: 1 - _share, SCHOOL: _share})
    if _share:
        MIXTURES[f'ctx_school_{_name}_op2'] = mixture(range(2, 11), {ZOO: 1 - _share, SCHOOL: _share},
                                                      template_ops={SCHOOL: [2]})
MIXTURES['ctx_school_op2_only'] = MIXTURES['ctx_school_1pct_op2']
# STUDY.md §5.2: RL zoo/school mixes (the released RL context sets; op range 2-20 is our assumption)
for _zoo in (1.0, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.1, 0.01, 0.0):
    MIXTURES[f'rl_ctx_zoo{_zoo:g}'] = mixture(range(2, 21), {ZOO: _zoo, SCHOOL: 1 - _zoo})


def parse_mixture(s) -> Mixture:
    """A Mixture, a MIXTURES name, or an ops string ('2-10', '2-4:0.5,5-7:0.3,8-10:0.2')."""
    if isinstance(s, Mixture):
        return s
    if isinstance(s, dict):
        return Mixture.from_dict(s)
    if isinstance(s, str) and s in MIXTURES:
        return MIXTURES[s]
    try:
        return mixture(s)
    except ValueError as e:
        raise ValueError(f"{e} (or name a mixture: {', '.join(sorted(MIXTURES))})") from None


def _rng_for(*key) -> random.Random:
    """A generator seeded from the key alone: the same problem on any machine, process or worker count."""
    h = hashlib.sha256(':'.join(map(str, key)).encode()).digest()
    return random.Random(int.from_bytes(h[:16], 'little'))


_EXCLUDE = frozenset()


def _row_at(args):
    """Problem number i of a (mixture, seed) stream, skipping excluded ids deterministically."""
    mix, seed, i = args
    for retry in range(1000):
        rng = _rng_for(seed, i, retry)
        op, template, mode = mix.sample(rng)
        p = generate(rng, op, template, mode, mix.world)
        if p.id not in _EXCLUDE:
            return p
    raise RuntimeError(f'problem {i}: 1000 excluded ids in a row; is the exclusion set the whole space?')


def _init_worker(exclude):
    global _EXCLUDE
    _EXCLUDE = exclude


def _map(fn, args, workers, exclude, desc):
    """[fn(a) for a in args] over `workers` processes, in order, with a progress bar."""
    from tqdm import tqdm
    global _EXCLUDE
    if workers <= 1 or len(args) < 200:
        old, _EXCLUDE = _EXCLUDE, frozenset(exclude)
        try:
            return [fn(a) for a in tqdm(args, desc=desc, disable=desc is None or len(args) < 5000, mininterval=1)]
        finally:
            _EXCLUDE = old
    import multiprocessing as mp
    with mp.get_context('spawn' if sys.platform == 'darwin' else 'fork').Pool(
            workers, _init_worker, (frozenset(exclude),)) as pool:
        chunk = max(16, min(2000, len(args) // (workers * 8)))
        return list(tqdm(pool.imap(fn, args, chunksize=chunk), total=len(args), desc=desc, mininterval=1,
                         disable=desc is None))


def generate_problems(n, mixture, seed=0, workers=1, exclude_ids=()) -> list:
    """n Problems from a mixture (anything parse_mixture reads: a Mixture, a MIXTURES name, an ops
    string or an op list), none whose id is in exclude_ids (the held-out set). Problem i depends
    only on (seed, i), whatever the number of workers. Rows for JSONL: [p.to_row() for p in ...]."""
    mix = parse_mixture(mixture)
    return _map(_row_at, [(mix, seed, i) for i in range(n)], workers, exclude_ids, 'generate')


def make_eval_set(ops, n_per_op_per_template, seed=1234, modes=MODES, templates=None, world=PAPER_WORLD) -> list:
    """Held-out problems: for every op and template, n problems, modes alternating (half each by
    default; the alternation continues across templates, so even n=1 covers both modes at every op),
    no duplicate ids. Seeded apart from training streams ('eval' in the key)."""
    modes = [modes] if isinstance(modes, str) else list(modes)
    out, seen = [], set()
    for op in (parse_ops(ops)[0][1] if isinstance(ops, str) else ops):
        for t, template in enumerate(templates or TEMPLATES):
            for j in range(n_per_op_per_template):
                for retry in range(1000):
                    rng = _rng_for('eval', seed, op, template, j, retry)
                    p = generate(rng, op, template, modes[(j + t * n_per_op_per_template) % len(modes)], world)
                    if p.id not in seen:
                        break
                seen.add(p.id)
                out.append(p)
    return out


# -----------------------------------------------------------------------------
# 5. JSONL rows and training text

def write_jsonl(path, rows):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        for r in rows:
            r = r.to_row() if isinstance(r, Problem) else r
            f.write(json.dumps(r, ensure_ascii=False) + '\n')
    os.replace(tmp, path)


def answer_of(solution: str) -> int:
    """The int after the last 'Answer:' of a gold solution."""
    tail = solution[solution.rindex('Answer:') + 7:].strip().rstrip('.')
    return int(tail)


def jsonl_files(path) -> list:
    """The files `path` names: a JSONL file, a directory (every *.jsonl below it, sorted) or a glob
    ('released/composition/val/*.jsonl'). ValueError when it names none."""
    import glob
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, '**', '*.jsonl'), recursive=True) if os.path.isdir(path)
                   else (f for f in glob.glob(path, recursive=True) if os.path.isfile(f)))
    if not files:
        raise ValueError(f"{path} names no JSONL file; pass a .jsonl file, a directory holding some, or a glob")
    return files


def _row_defaults(path):
    """op / template a released file's name gives (composition/val/op12-200.jsonl,
    context/<template>/test/op5_1k.jsonl), for rows that lack them."""
    out, m = {}, re.search(r'op(\d+)[-_][^/\\]*\.jsonl$', path)
    if m:
        out['op'] = int(m.group(1))
    named = [t for t in os.path.normpath(path).split(os.sep) if t in TEMPLATES]
    if named:
        out['template'] = named[-1]
    return out


def read_jsonl(path) -> list:
    """Rows of a JSONL file, or of every file of a directory / glob (jsonl_files). Released rows without
    'graph' / 'answer' get them from the gold solution; without op / template, from the file's name (else
    the template from the problem's place names); without mode, from the solution (reverse ones say the
    unknown is not known yet). The release's rows also carry 'depth' (the depth of the question's graph,
    which our generator does not write): read as an int where present and kept in the row."""
    path = os.fspath(path)
    files = jsonl_files(path)
    if len(files) > 1 or files[0] != path:
        return [r for f in files for r in read_jsonl(f)]
    rows, named = [], _row_defaults(path)
    with open(path, encoding='utf-8') as f:
        for line in f:
            if not line.strip():
                continue
            r = {**named, **json.loads(line)}
            if 'mode' not in r:
                r['mode'] = REVERSE if _UNKNOWN_MARK in r['solution'] else FORWARD
            if 'template' not in r:   # place names belong to one template each
                r['template'] = next((t.name for t in TEMPLATES.values()
                                      if any(p in r['problem'] for ps in t.places for p in ps)), 'unknown')
            if r.get('depth') is not None:
                r['depth'] = int(r['depth'])
            if 'answer' not in r:
                r['answer'] = answer_of(r['solution'])
            if 'graph' not in r:
                r['graph'] = parse_solution(r['solution'], r.get('mode'))
            if 'id' not in r or not isinstance(r['id'], str):   # released ids are hash(text) % 23
                r['id'] = problem_id(r['problem'], r['question'])
            rows.append(r)
    return rows


def prompt_text(row: dict) -> str:
    """What the model sees at RL / eval time: the training text up to and including '<solution>'."""
    return f"<question> {row['problem'].strip()} {row['question']} </question> <solution>"


def training_text(row: dict) -> str:
    sol = row['solution']
    cut = sol.rfind('Answer:')
    body = (sol[:cut] if cut >= 0 else sol).strip()
    answer = row['answer'] if 'answer' in row else answer_of(sol)
    return f'{prompt_text(row)} {body} </solution> <answer> {answer} </answer>'


# -----------------------------------------------------------------------------
# 6. Tokenizer (STUDY.md §3)
#
#   Tokenizer          a tiktoken.Encoding plus its identity (a sha1 over everything that defines
#                      the encoding); shards and checkpoints store the identity, and mixing two
#                      tokenizers is a clear error (check_identity).
#   train_tokenizer    byte-level BPE learned from training texts: ids 0..9 are SPECIAL_TOKENS, then
#                      the 256 bytes, then every integer 0..1000 as one token with and without a
#                      leading space ("(7)" and " 7"), then the learned merges.
# The original study's tokenizer, converted exactly, is in interop.py.

SPECIAL_TOKENS = ['[UNK]', '[PAD]', '[BOS]', '[EOS]', '<question>', '</question>', '<solution>', '</solution>',
                  '<answer>', '</answer>']

# Split regex (tiktoken / fancy-regex syntax): contractions, words with their leading space, numbers
# of up to 4 digits with their leading space, punctuation runs with their leading space, whitespace
# (a run before a word leaves its last space to the word). BPE merges never cross these pieces.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}{1,4}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same split with Python's `re` (no \p{..}), used only to count words when training; it agrees
# with PAT_STR on our texts (tested) and can differ on exotic characters, which only costs merges.
_TRAIN_SPLIT = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d{1,4}| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")
MAX_INT_TOKEN = 1000  # integers 0..MAX_INT_TOKEN are single tokens, bare and after a space
# specials + bytes + bare 10..1000 (0..9 are bytes) + " 0".." 1000": the vocabulary before any merge
N_FIXED_TOKENS = len(SPECIAL_TOKENS) + 256 + (MAX_INT_TOKEN + 1 - 10) + (MAX_INT_TOKEN + 1)
# 2258 fixed + up to 558 merges (a multiple of 64). The paper's 2200 cannot hold the 2002 integer
# tokens plus words; on the 114 reference problems training runs out of pairs seen twice at 512
# merges, by which point every word of the task is one token.
DEFAULT_VOCAB_SIZE = 2816


def tokenizer_identity(kind, pat_str, mergeable_ranks, special_tokens):
    """sha1 (hex) over everything that defines an encoding: kind, split regex, ranks, specials."""
    spec = {'kind': kind, 'pat_str': pat_str,
            'ranks': [[base64.b64encode(b).decode(), r]
                      for b, r in sorted(mergeable_ranks.items(), key=lambda kv: kv[1])],
            'specials': sorted([s, i] for s, i in special_tokens.items())}
    return hashlib.sha1(json.dumps(spec, sort_keys=True, separators=(',', ':')).encode()).hexdigest()


def check_identity(expected, got, what):
    """Raise ValueError unless the tokenizer identity `got` (read from `what`: shards, a checkpoint)
    equals `expected` (the tokenizer in use)."""
    if expected != got:
        raise ValueError(f"tokenizer mismatch: {what} was made with tokenizer {got}, but the tokenizer in use is "
                         f"{expected}. Token ids of different tokenizers mean different things: use the "
                         f"tokenizer.json that {what} was made with, or rebuild it with this tokenizer.")


_TOKENIZER_KINDS = {}   # Tokenizer.kind -> class, for Tokenizer.load (subclasses register themselves)


class Tokenizer:
    """A tiktoken.Encoding with named special tokens and an identity. Special tokens written in the
    text ('<question>', '[EOS]', ...) are encoded as specials; decode(encode(t)) == t for every str."""
    kind = 'bpe'

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _TOKENIZER_KINDS[cls.kind] = cls

    def __init__(self, mergeable_ranks: dict, special_tokens: dict, pat_str: str, name: str = 'gsm-bpe'):
        self.name, self.pat_str = name, pat_str
        self.mergeable_ranks, self.special_tokens = dict(mergeable_ranks), dict(special_tokens)
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=self.mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.identity = tokenizer_identity(self.kind, pat_str, self.mergeable_ranks, self.special_tokens)
        self.vocab_size = self.enc.max_token_value + 1  # ids are 0..vocab_size-1 (possibly with holes)
        self.unk_id, self.pad_id = self.id_of('[UNK]'), self.id_of('[PAD]')
        self.bos_id, self.eos_id = self.id_of('[BOS]'), self.id_of('[EOS]')

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, identity={self.identity[:12]})"

    def id_of(self, special: str) -> int:
        return self.special_tokens[special]

    def encode(self, text: str) -> list:
        return self.enc.encode(text, allowed_special='all')

    def encode_batch(self, texts, num_threads: int = 8) -> list:
        return self.enc.encode_batch(list(texts), num_threads=num_threads, allowed_special='all')

    def decode(self, ids) -> str:
        """Text of the ids (a list, array or tensor). An id outside the vocabulary (e.g. sampled from a
        model whose embedding is padded past vocab_size) decodes to U+FFFD instead of raising."""
        ids = ids.tolist() if hasattr(ids, 'tolist') else list(ids)
        try:
            return self.enc.decode(ids)
        except KeyError:
            valid = set(self.mergeable_ranks.values()) | set(self.special_tokens.values())
            parts = [self.enc.decode_single_token_bytes(i) if i in valid else '\ufffd'.encode() for i in ids]
            return b''.join(parts).decode('utf-8', errors='replace')

    def to_dict(self) -> dict:
        return {'format': 'gsm-tokenizer-v1', 'kind': self.kind, 'name': self.name, 'identity': self.identity,
                'pat_str': self.pat_str, 'special_tokens': self.special_tokens,
                'ranks': [base64.b64encode(b).decode() for b, _ in sorted(self.mergeable_ranks.items(),
                                                                          key=lambda kv: kv[1])],
                'rank_ids': sorted(self.mergeable_ranks.values())}

    def save(self, path):
        """Atomic write of the JSON form."""
        model.write_json(self.to_dict(), path, indent=None)

    @classmethod
    def load(cls, path):
        """Load a tokenizer saved by save(); the stored identity is checked against the contents."""
        with open(path, encoding='utf-8') as f:
            d = json.load(f)
        if d.get('format') != 'gsm-tokenizer-v1':
            raise ValueError(f"{path}: not a tokenizer saved by Tokenizer.save (format {d.get('format')!r})")
        ranks = {base64.b64decode(b): r for b, r in zip(d['ranks'], d['rank_ids'])}
        if d['kind'] == 'hf-original':
            import interop  # noqa: F401  (the original study's tokenizer class lives there and registers itself)
        kind = _TOKENIZER_KINDS.get(d['kind'])
        if kind is None:
            raise ValueError(f"{path}: unknown tokenizer kind {d['kind']!r}")
        tok = kind(ranks, d['special_tokens'], d['pat_str'], name=d['name'])
        if tok.identity != d['identity']:
            raise ValueError(f"{path}: stored identity {d['identity']} does not match its contents "
                             f"({tok.identity}); the file was edited or is corrupt")
        return tok


_TOKENIZER_KINDS[Tokenizer.kind] = Tokenizer


def _learn_merges(word_counts: dict, n_new: int, known: set, min_count: int = 2) -> list:
    """Byte-pair merges over a word-frequency table ({word bytes: count}), most frequent pair first
    (ties: smallest pair), until n_new new tokens exist or no pair occurs min_count times. Returns the
    new tokens (bytes) in merge order. Pair counts are updated only for the words a merge touches, so
    a corpus of a few hundred distinct words trains in well under a second."""
    words = [[bytes([b]) for b in w] for w in word_counts]
    freq = list(word_counts.values())
    pairs, where = collections.Counter(), collections.defaultdict(set)

    def count(i, sign):
        w = words[i]
        for p in zip(w, w[1:]):
            pairs[p] += sign * freq[i]
            if sign > 0:
                where[p].add(i)
            elif pairs[p] == 0:
                del pairs[p]

    for i in range(len(words)):
        count(i, +1)
    new = []
    while len(new) < n_new and pairs:
        (a, b), c = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if c < min_count:
            break
        if a + b not in known:  # the same bytes can be reached by two different pairs
            new.append(a + b)
            known.add(a + b)
        for i in where.pop((a, b)):
            w = words[i]
            if len(w) < 2:
                continue
            count(i, -1)
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            count(i, +1)
    return new


def train_tokenizer(texts, vocab_size: int = DEFAULT_VOCAB_SIZE, name: str = 'gsm-bpe') -> Tokenizer:
    """Byte-level BPE on `texts` (training_text strings). Ids: SPECIAL_TOKENS 0..9, bytes 10..265, the
    integers (bare 10..1000, then " 0".." 1000"), then learned merges up to vocab_size entries (fewer
    if the corpus runs out of pairs seen twice). Digits are never merged with anything else, so every
    integer 0..1000 is one token whether or not a space precedes it."""
    if vocab_size < N_FIXED_TOKENS:
        raise ValueError(f"vocab_size={vocab_size} is too small: specials, bytes and the integers 0..{MAX_INT_TOKEN} "
                         f"(bare and after a space) alone take {N_FIXED_TOKENS} entries")
    specials = re.compile('|'.join(map(re.escape, SPECIAL_TOKENS)))
    counts = collections.Counter()
    for text in texts:
        for part in specials.split(text):
            counts.update(_TRAIN_SPLIT.findall(part))
    words = {w.encode(): c for w, c in counts.items() if not any(ch.isdigit() for ch in w)}
    ranks = {}
    for tok in ([bytes([b]) for b in range(256)] + [str(n).encode() for n in range(10, MAX_INT_TOKEN + 1)] +
                [b' ' + str(n).encode() for n in range(MAX_INT_TOKEN + 1)]):
        ranks[tok] = len(SPECIAL_TOKENS) + len(ranks)
    for tok in _learn_merges(words, vocab_size - N_FIXED_TOKENS, known=set(ranks)):
        ranks[tok] = len(SPECIAL_TOKENS) + len(ranks)
    return Tokenizer(ranks, {s: i for i, s in enumerate(SPECIAL_TOKENS)}, PAT_STR, name=name)


# -----------------------------------------------------------------------------
# 7. Token shards, the shard loader and the loss mask (STUDY.md §4)
#
# Token shards: {dir}/train_000.bin ... (uint16, one flat stream of documents, each encode(text) +
# [EOS]), val.bin, tokenizer.json and meta.json. meta.json is written last and lists every file with
# its token count, so a directory without it (or with a file of another size) is incomplete.
# ShardLoader yields packed (x, y) windows in a deterministic order per seed and epoch, a disjoint
# share per DDP rank, with state_dict()/load_state_dict() for exact resume mid-epoch.

SHARD_FORMAT = 'gsm-shards-v1'


class _SplitWriter:
    """Appends uint16 tokens to {prefix}_000.bin, {prefix}_001.bin, ... (shard_tokens each), or to
    {prefix}.bin when shard_tokens is None; each file is written as .tmp and renamed when complete."""

    def __init__(self, out_dir, prefix, shard_tokens):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.files, self.f, self.n = [], None, 0  # files: [name, tokens] of the completed files

    def _name(self):
        return f"{self.prefix}.bin" if self.shard_tokens is None else f"{self.prefix}_{len(self.files):03d}.bin"

    def write(self, tokens):
        while len(tokens):
            if self.f is None:
                self.f, self.n = open(os.path.join(self.out_dir, self._name() + '.tmp'), 'wb'), 0
            room = len(tokens) if self.shard_tokens is None else self.shard_tokens - self.n
            self.f.write(tokens[:room].tobytes())
            self.n += min(room, len(tokens))
            tokens = tokens[room:]
            if self.shard_tokens is not None and self.n == self.shard_tokens:
                self._finish()

    def _finish(self):
        name = self._name()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(os.path.join(self.out_dir, name + '.tmp'), os.path.join(self.out_dir, name))
        self.files.append([name, self.n])
        self.f = None

    def abort(self):
        if self.f is not None:
            self.f.close()
            os.remove(os.path.join(self.out_dir, self._name() + '.tmp'))
            self.f = None

    def close(self):
        if self.f is not None or not self.files:  # an empty split still gets one (empty) file
            if self.f is None:
                self.f, self.n = open(os.path.join(self.out_dir, self._name() + '.tmp'), 'wb'), 0
            self._finish()
        return self.files


def _write_split(docs, tokenizer, out_dir, prefix, token_budget, shard_tokens, batch_docs):
    writer = _SplitWriter(out_dir, prefix, shard_tokens)
    n_tokens, n_docs, full = 0, 0, False
    docs = iter(docs)
    try:
        while not full:
            batch = [d for _, d in zip(range(batch_docs), docs)]
            if not batch:
                break
            out = []
            for ids in tokenizer.encode_batch(batch):
                if token_budget is not None and n_tokens + len(ids) + 1 > token_budget:
                    full = True  # whole documents only: the next one would pass the budget
                    break
                out += ids
                out.append(tokenizer.eos_id)
                n_tokens, n_docs = n_tokens + len(ids) + 1, n_docs + 1
            writer.write(np.array(out, dtype=np.uint16))
    except BaseException:
        writer.abort()
        raise
    return {'tokens': n_tokens, 'docs': n_docs, 'files': writer.close()}


def write_shards(docs, tokenizer, out_dir, token_budget=None, shard_tokens=100_000_000, val_docs=None, meta=None,
                 batch_docs=1024) -> dict:
    """Tokenize documents (texts) into out_dir: train shards of shard_tokens tokens, val.bin from
    val_docs, tokenizer.json and meta.json (written last). Stops taking documents when the next one
    would pass token_budget (so the train split holds at most token_budget tokens, whole documents);
    with no budget it consumes all of `docs`. `meta` (e.g. the mixture spec) is stored under
    meta.json's 'meta'. Returns the meta.json contents."""
    if tokenizer.vocab_size > 65536:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit uint16 shards")
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):  # from here on the directory is incomplete until the new meta.json lands
        os.remove(meta_path)
    splits = {'train': _write_split(docs, tokenizer, out_dir, 'train', token_budget, shard_tokens, batch_docs)}
    if val_docs is not None:
        splits['val'] = _write_split(val_docs, tokenizer, out_dir, 'val', None, None, batch_docs)
    tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
    keep = {name for s in splits.values() for name, _ in s['files']}
    for name in os.listdir(out_dir):  # shards of an earlier, larger write, and leftovers of a killed one
        if re.fullmatch(r'(train_\d+|val)\.bin(\.tmp)?', name) and name not in keep:
            os.remove(os.path.join(out_dir, name))
    info = {'format': SHARD_FORMAT, 'tokenizer_identity': tokenizer.identity, 'tokenizer_name': tokenizer.name,
            'vocab_size': tokenizer.vocab_size, 'eos_id': tokenizer.eos_id, 'dtype': 'uint16',
            'token_budget': token_budget, 'shard_tokens': shard_tokens, 'splits': splits, 'meta': meta or {}}
    model.write_json(info, meta_path)
    return info


def load_shard_meta(dir) -> dict:
    """meta.json of a complete shard directory; raises if it is missing or a listed file has another size."""
    path = os.path.join(dir, 'meta.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {dir} is not a complete token-shard directory "
                                f"(never built, or its writer was interrupted)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get('format') != SHARD_FORMAT:
        raise ValueError(f"{path}: unknown shard format {meta.get('format')!r}")
    for split in meta['splits'].values():
        for name, n in split['files']:
            fp = os.path.join(dir, name)
            if not os.path.exists(fp) or os.path.getsize(fp) != 2 * n:
                raise ValueError(f"{fp}: missing or not {n} tokens as meta.json says; rebuild {dir}")
    return meta


def count_tokens(dir, split='train') -> int:
    """Tokens in a split of a shard directory (documents and their EOS tokens)."""
    return load_shard_meta(dir)['splits'][split]['tokens']


class ShardLoader:
    """Packed next-token batches from a shard directory: x, y = int64 tensors [batch_size, seq_len],
    y[:, t] = x[:, t + 1] (windows of seq_len + 1 consecutive tokens of the split's stream; documents
    are packed and separated by EOS, and a window may span documents and shard files).

    An epoch cuts the stream into windows at offset + k * seq_len (offset random in [0, seq_len))
    and visits them in a random order; both come from (seed, epoch), so every epoch differs and every
    run with the same seed is identical. A global step takes the next batch_size * world_size windows
    of that order and rank r gets rows [r * batch_size, (r + 1) * batch_size): the union over ranks is
    exactly the batch one process with batch_size * world_size sees at the same step. The incomplete
    last global batch of an epoch is skipped. Iterating never ends (epochs roll over).

    state_dict() is the same on every rank (epoch and global position), so any rank's state resumes
    any rank, and also a run with another batch_size / world_size (at the same window position).

    whole_docs=True packs whole documents instead: each window holds consecutive documents of the
    stream that fit in seq_len + 1 tokens (a longer document is cut into pieces of its own), the rest
    of the row is PAD with target -100, and the windows are visited in a random order per epoch. No
    problem is cut from its question, so short windows (cheap attention) lose nothing but padding."""

    def __init__(self, dir, split, batch_size, seq_len, rank=0, world_size=1, seed=0, tokenizer_identity=None,
                 whole_docs=False):
        meta = load_shard_meta(dir)
        if tokenizer_identity is not None:
            check_identity(tokenizer_identity, meta['tokenizer_identity'], f"the token shards in {dir}")
        if split not in meta['splits']:
            raise ValueError(f"{dir} has no {split!r} split (has {sorted(meta['splits'])})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dir, self.split, self.seed = dir, split, seed
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.tokenizer_identity = meta['tokenizer_identity']
        self._shards = [np.memmap(os.path.join(dir, name), dtype=np.uint16, mode='r')
                        for name, n in meta['splits'][split]['files'] if n > 0]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards]).tolist()
        self.n_tokens = self._starts[-1]
        need = (batch_size * world_size + 1) * seq_len
        if self.n_tokens < need:
            raise ValueError(f"the {split} split of {dir} has {self.n_tokens:,} tokens, fewer than the {need:,} "
                             f"one global batch of {batch_size} x {world_size} windows of {seq_len} needs")
        self.epoch, self.pos = 0, 0  # pos: windows of this epoch's order already handed out (all ranks)
        self._plan_epoch = None
        self.whole_docs, self._eos = whole_docs, int(meta['eos_id'])
        self._windows = self._doc_windows() if whole_docs else None
        if whole_docs and len(self._windows) < batch_size * world_size:
            raise ValueError(f"the {split} split of {dir} has {len(self._windows):,} whole-document windows of "
                             f"{seq_len} tokens, fewer than one global batch of {batch_size} x {world_size}")

    def _doc_windows(self):
        """[n, 2] (start, length) of the whole-document windows, greedily in stream order: consecutive
        documents while they fit in seq_len + 1 tokens; a document longer than that in pieces."""
        cap = self.seq_len + 1
        ends = np.concatenate([np.flatnonzero(np.asarray(sh) == self._eos) + st + 1
                               for sh, st in zip(self._shards, self._starts)]).tolist()
        if not ends or ends[-1] < self.n_tokens:    # an unterminated tail is a document too
            ends.append(self.n_tokens)
        windows, start, w_start = [], 0, 0          # w_start: where the window being filled begins
        for end in ends:
            if end - w_start > cap:                 # this document does not fit: close the window
                if start > w_start:
                    windows.append((w_start, start - w_start))
                w_start = start
                while end - w_start > cap:          # a document longer than a window, in pieces that
                    windows.append((w_start, cap))  # overlap by one token, so every token is a target once
                    w_start += cap - 1
            start = end
        if start > w_start:
            windows.append((w_start, start - w_start))
        return np.array(windows, dtype=np.int64)

    def windows_per_epoch(self) -> int:
        """How many windows one epoch visits (at most; packed epochs start at a random offset)."""
        return len(self._windows) if self.whole_docs else (self.n_tokens - 1) // self.seq_len

    def _plan(self):
        """(offset, window order) of the current epoch, from (seed, epoch) only."""
        if self._plan_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            if self.whole_docs:
                offset, n_windows = 0, len(self._windows)
            else:
                offset = int(rng.integers(self.seq_len))
                n_windows = (self.n_tokens - 1 - offset) // self.seq_len
            self._offset, self._order = offset, rng.permutation(n_windows)
            self._plan_epoch = self.epoch
        return self._offset, self._order

    def _read(self, start, n):
        k = bisect.bisect_right(self._starts, start) - 1
        lo = start - self._starts[k]
        out = self._shards[k][lo:lo + n]
        while len(out) < n:  # the window continues into the next file
            k += 1
            out = np.concatenate([out, self._shards[k][:n - len(out)]])
        return out

    def __iter__(self):
        return self

    def __next__(self):
        gb = self.batch_size * self.world_size
        offset, order = self._plan()
        if self.pos + gb > len(order):
            self.epoch, self.pos = self.epoch + 1, 0
            offset, order = self._plan()
        rows = order[self.pos + self.rank * self.batch_size:self.pos + (self.rank + 1) * self.batch_size]
        self.pos += gb
        buf = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        if not self.whole_docs:
            for i, w in enumerate(rows):
                buf[i] = self._read(offset + int(w) * self.seq_len, self.seq_len + 1)
            buf = torch.from_numpy(buf)
            return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        buf.fill(self._eos)                          # padding: EOS inputs (never attended), no targets
        lens = np.empty(self.batch_size, dtype=np.int64)
        for i, w in enumerate(rows):
            start, n = (int(v) for v in self._windows[w])
            buf[i, :n], lens[i] = self._read(start, n), n
        buf = torch.from_numpy(buf)
        y = buf[:, 1:].clone()
        y[torch.arange(self.seq_len)[None, :] >= torch.from_numpy(lens)[:, None] - 1] = -100
        return buf[:, :-1].contiguous(), y

    def state_dict(self) -> dict:
        return {'split': self.split, 'seq_len': self.seq_len, 'seed': self.seed, 'n_tokens': self.n_tokens,
                'whole_docs': self.whole_docs,
                'tokenizer_identity': self.tokenizer_identity, 'epoch': self.epoch, 'pos': self.pos}

    def load_state_dict(self, state: dict):
        """Continue where `state` left off. The data (tokens, tokenizer), split, seq_len and seed must be
        the ones the state was taken with; batch_size and world_size may differ."""
        check_identity(self.tokenizer_identity, state['tokenizer_identity'], 'the data-loader state')
        state = {'whole_docs': False, **state}       # states written before whole_docs existed
        for key in ('split', 'seq_len', 'seed', 'n_tokens', 'whole_docs'):
            if state[key] != getattr(self, key):
                raise ValueError(f"data-loader state has {key}={state[key]!r} but this loader has "
                                 f"{getattr(self, key)!r}; exact resume needs the same data and settings")
        self.epoch, self.pos = int(state['epoch']), int(state['pos'])


def mask_question_targets(x, y, tokenizer):
    """y with -100 wherever the target token is part of a question (<question> ... </question>, tags
    included), so the loss covers only solutions and answers. x, y: a ShardLoader batch (y = x shifted
    by one); a window that starts inside a question is recognised by its first tag being a close, and
    a window with no tag at all (shorter than one question or solution) is masked whole: what it
    holds cannot be told from the window alone."""
    s = torch.cat([x[:, :1], y], 1)  # the whole window: s[:, t + 1] = y[:, t]
    opens = (s == tokenizer.id_of('<question>')).long()
    closes = (s == tokenizer.id_of('</question>')).long()
    marks = opens - closes                               # +1 open tag, -1 close tag, 0 other
    first = marks.gather(1, (marks != 0).long().argmax(1, keepdim=True))  # first tag's sign (0: none)
    inside = opens.cumsum(1) - (closes.cumsum(1) - closes) + (first < 0).long() > 0
    inside |= (marks == 0).all(1, keepdim=True)
    return y.masked_fill(inside[:, 1:], -100)


# -----------------------------------------------------------------------------
# 8. Dataset directories: held-out set, tokenizer, token shards (what every training stage reads)
#
# A dataset directory holds eval.jsonl (held-out problems), tokenizer.json, train_*.bin / val.bin
# (uint16 token streams) and meta.json (written last: a directory without it is incomplete).
# Every directory built with the default tokenizer shares one tokenizer identity, so a base model
# can be mid-trained or RL-trained on any other directory.

def standard_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> 'Tokenizer':
    """The project's tokenizer: BPE trained on a fixed seeded sample of every op (2..20), template and
    mode. Deterministic, so it has the same identity on every machine and in every dataset."""
    return _standard_tokenizer(int(vocab_size))


@functools.lru_cache(maxsize=None)
def _standard_tokenizer(vocab_size):
    problems = generate_problems(3000, MIXTURES['eval_all'], seed='tokenizer')
    return train_tokenizer([training_text(p.to_row()) for p in problems], vocab_size)


def resolve_tokenizer(tok=None) -> 'Tokenizer':
    """None -> the standard tokenizer; a Tokenizer; a tokenizer.json path; or a dataset directory."""
    if tok is None or isinstance(tok, Tokenizer):
        return tok or standard_tokenizer()
    path = os.path.join(tok, 'tokenizer.json') if os.path.isdir(tok) else tok
    if not os.path.exists(path):
        raise FileNotFoundError(f'tokenizer {tok!r} not found: give a tokenizer.json or a dataset directory')
    return Tokenizer.load(path)


def _text_stream(mix, seed, workers, exclude, bar, chunk=4096):
    """Training texts of problems 0, 1, 2, ... of the (mixture, seed) stream, without the held-out ids."""
    k = 0
    while True:
        args = [(mix, seed, i) for i in range(k * chunk, (k + 1) * chunk)]
        for p in _map(_row_at, args, workers, exclude, None):
            bar.update(1)
            yield training_text(p.to_row())
        k += 1


def build_dataset(out_dir, mixture, token_budget, seed=0, tokenizer=None, eval_ops=range(2, 21), eval_n=10,
                  eval_seed=1234, val_n=512, workers=1) -> dict:
    """Write a dataset directory: eval.jsonl (eval_n problems per op in eval_ops and template, in the
    mixture's modes: half forward / half reverse by default), then train shards of `token_budget` tokens from `mixture` that never
    contain a held-out problem, val.bin (val_n problems of the same mixture, another seed), the
    tokenizer and meta.json. Returns meta.json's contents."""
    from tqdm import tqdm
    mix = parse_mixture(mixture)
    tok = resolve_tokenizer(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    # the held-out problems are in the mixture's modes (a forward-only mixture gets eval_n forward
    # problems per op and template, not eval_n / 2)
    modes = [m for m, w in mix.modes if w > 0] or MODES
    held_out = make_eval_set(list(eval_ops), eval_n, seed=eval_seed, modes=modes, world=mix.world) if eval_n else []
    write_jsonl(os.path.join(out_dir, 'eval.jsonl'), held_out)
    exclude = frozenset(p.id for p in held_out)
    val = [training_text(p.to_row()) for p in _map(_row_at, [(mix, f'{seed}-val', i) for i in range(val_n)],
                                                   workers, exclude, None)]
    bar = tqdm(desc=f'build {os.path.basename(os.path.normpath(out_dir))}', unit='doc', mininterval=1)
    docs = _text_stream(mix, seed, workers, exclude, bar)
    meta = {'mixture': mix.to_dict(), 'seed': seed, 'eval_ops': list(eval_ops), 'eval_n': eval_n,
            'eval_seed': eval_seed, 'n_eval': len(held_out)}
    info = write_shards(docs, tok, out_dir, token_budget=int(token_budget), val_docs=val, meta=meta)
    bar.close()
    return info


def load_eval_rows(data_dir) -> list:
    """The held-out problems of a dataset directory (rows with gold graphs)."""
    path = os.path.join(data_dir, 'eval.jsonl')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: build the dataset first (python data.py build --out={data_dir} ...)')
    return read_jsonl(path)


# -----------------------------------------------------------------------------
# 9. Command line
#
# Every command parses --key=value with model.configure (typed defaults below; --help lists them);
# a bad argument is one line on stderr and exit status 2.

SAMPLE_DEFAULTS = dict(
    out='',              # the JSONL file to write (required)
    ops='',              # op range: '2-20' (default), '2-4,8', weighted '2-4:0.5,5-7:0.5'
    templates='',        # comma-separated template names ('' = all, uniform)
    modes='',            # comma-separated modes ('' = both, uniform)
    mixture='',          # instead of ops/templates/modes: a MIXTURES name or an ops string
    n=1000,              # problems
    seed=0,              # problem i depends only on (seed, i)
    workers=1,           # generator processes
)
VERIFY_DEFAULTS = {
    'in': '',            # JSONL rows with "graph" (or a gold "solution") and "prediction" (required)
    'out': '',           # optional JSONL of per-row verdicts and rewards
}
BUILD_DEFAULTS = dict(
    out='',              # the dataset directory (required)
    mixture='',          # training mixture: a MIXTURES name or an ops string (required)
    tokens=0.0,          # training tokens (required; 5e6 is fine)
    seed=0,              # generator seed of the training stream
    eval_ops='2-20',     # ops of the held-out set
    eval_n=10,           # held-out problems per op and template
    eval_seed=1234,      # seed of the held-out set
    val_n=512,           # validation problems (val.bin)
    tokenizer='',        # a tokenizer.json or dataset directory ('' = the standard tokenizer)
    workers=1,           # generator processes
)
TOKENIZER_DEFAULTS = dict(
    out='',              # where to write the standard tokenizer's tokenizer.json (required)
    vocab_size=DEFAULT_VOCAB_SIZE,
)


def _sample_main(argv):
    a = model.configure(SAMPLE_DEFAULTS, argv, presets=False)
    if not a.out:
        raise model.UsageError('sample needs --out=FILE.jsonl')
    if a.ops and a.mixture:
        raise model.UsageError('give --ops or --mixture, not both')
    if a.mixture and (a.templates or a.modes):
        raise model.UsageError('--templates/--modes go with --ops, not with --mixture')
    try:
        mix = parse_mixture(a.mixture) if a.mixture else mixture(a.ops or '2-20', a.templates or None,
                                                                a.modes or None)
    except ValueError as e:
        raise model.UsageError(str(e)) from None
    if a.n < 1 or a.workers < 1:
        raise model.UsageError('--n and --workers must be at least 1')
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir):
        raise model.UsageError(f"--out={a.out}: directory {out_dir} does not exist; create it first")
    problems = generate_problems(a.n, mix, a.seed, a.workers)
    write_jsonl(a.out, problems)
    print(f"wrote {len(problems)} problems to {a.out}")


def verify_main(argv) -> int:
    """python data.py verify --in=FILE.jsonl [--out=VERDICTS.jsonl]. Returns the exit status."""
    argv = list(argv)
    if argv and argv[0] == 'verify':
        argv = argv[1:]
    try:
        a = model.configure(VERIFY_DEFAULTS, argv, presets=False)
        inp, out = a['in'], a['out']
        if not inp:
            raise model.UsageError('missing --in=FILE.jsonl (rows with "graph" or "solution", and "prediction")')
        try:
            with open(inp, encoding='utf-8') as f:
                lines = f.readlines()
        except OSError as e:
            raise model.UsageError(f'cannot read --in={inp} ({e.strerror}); give an existing JSONL file') from None
        rows = []
        for i, line in enumerate(lines):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise model.UsageError(f'{inp} line {i + 1} is not valid JSON ({e.msg}); fix or remove '
                                           f'that line') from None
        try:
            verdicts, summary = verify_rows(rows)
        except ValueError as e:
            raise model.UsageError(f'{inp}: {e}') from None
    except model.UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if out:
        write_jsonl(out, ({**{k: row[k] for k in ('id', 'op', 'mode', 'template') if k in row}, **v.to_dict(),
                           'rewards': {kind: reward(v, kind) for kind in REWARDS}} for row, v in zip(rows, verdicts)))
    s = summary
    if not s['n']:
        print('verified 0 rows')
        return 0
    print('verified %d rows: outcome %.4f  perfect %.4f  process_acc %.4f  value_err %.3f  parent_err %.3f  '
          'missing %.3f  extra %.3f  answer_err %.3f' % (s['n'], s['outcome'], s['perfect'], s['process_acc'],
                                                          s['value_errors'], s['parent_errors'], s['missing'],
                                                          s['extra'], s['answer_error']))
    print('mean rewards: ' + '  '.join('%s %.4f' % (k, s['reward_' + k]) for k in REWARDS))
    for m, ms in s.get('by_mode', {}).items():
        print('  %s (%d rows): outcome %.4f  perfect %.4f  process_acc %.4f'
              % (m, ms['n'], ms['outcome'], ms['perfect'], ms['process_acc']))
    if out:
        print('wrote %d verdicts to %s' % (len(verdicts), out))
    return 0


def _build_main(argv):
    a = model.configure(BUILD_DEFAULTS, argv, presets=False)
    if not (a.out and a.mixture and a.tokens):
        raise model.UsageError('build needs --out=DIR --mixture=NAME_OR_OPS --tokens=N '
                               '(e.g. python data.py build --out=data/base --mixture=2-10 --tokens=5e6)')
    try:
        eval_ops = parse_ops(a.eval_ops)[0][1]
        mix = parse_mixture(a.mixture)
    except ValueError as e:
        raise model.UsageError(str(e)) from None
    info = build_dataset(a.out, mix, int(a.tokens), seed=a.seed, tokenizer=a.tokenizer or None, eval_ops=eval_ops,
                         eval_n=a.eval_n, eval_seed=a.eval_seed, val_n=a.val_n, workers=a.workers)
    print(f"wrote {a.out}: {info['splits']['train']['tokens']:,} train tokens, "
          f"{info['splits']['val']['tokens']:,} val tokens, {info['meta']['n_eval']} held-out problems, "
          f"tokenizer {info['tokenizer_identity'][:12]}")


def _tokenizer_main(argv):
    a = model.configure(TOKENIZER_DEFAULTS, argv, presets=False)
    if not a.out:
        raise model.UsageError('tokenizer needs --out=tokenizer.json (the standard tokenizer; --vocab_size=N '
                               'to change its size)')
    tok = standard_tokenizer(a.vocab_size)
    tok.save(a.out)
    print(f"wrote {a.out}: {tok}")


COMMANDS = {'sample': _sample_main, 'verify': lambda argv: sys.exit(verify_main(argv)), 'build': _build_main,
            'tokenizer': _tokenizer_main}



if __name__ == '__main__':
    model.cli('data.py', COMMANDS)  # one usage line lists the commands
