"""
The task world: GSM-Infinite "medium", zero-context (STUDY.md §1), end to end in one file, in
pipeline order. Each section below starts with a numbered header; this docstring is its map.

1. The task world and its generator (STUDY.md §1)
     Template, TEMPLATES, MODES = (FORWARD, REVERSE), OP_MIN, OP_MAX, VMAX, P_FINAL_TOTAL, P_CLOSE
     REFERENCE_SIZES                    the original's per-op sizes (`python bench.py --only=sizes`)
2. Rendering and the gold graph
     generate(rng, op, template, mode)  one Problem with its gold graph, built directly at the requested op
     Problem (.to_row()), problem_id, graph_op, ref, lin
3. Mixtures, problem streams and evaluation sets (STUDY.md §4, §5)
     Mixture, mixture(...), parse_ops, MIXTURES, parse_mixture, ZOO, SCHOOL
     generate_problems(n, mixture, seed, workers, exclude_ids)   problem i depends only on (seed, i)
     make_eval_set(ops, n_per_op_per_template)                   the held-out problems
4. JSONL rows and training text
     read_jsonl, write_jsonl            released rows (problem, question, solution, op, id, template, mode);
                                        every stage reads problem rows through read_jsonl (bad rows: one line)
     answer_of, prompt_text, training_text
                                        "<question> ... </question> <solution> ... </solution> <answer> N </answer>"
5. Dataset directories (what every training stage reads) and held-out rows
     build_dataset, standard_tokenizer, resolve_tokenizer, load_eval_rows (every stage's held-out rows)
6. Command line
     COMMANDS (common.cli dispatches them), verify_main,
     SAMPLE_DEFAULTS, VERIFY_DEFAULTS, BUILD_DEFAULTS, TOKENIZER_DEFAULTS

Reading a solution back -- the parser, the graph verifier (strict and lenient) and the RL rewards --
is verifier.py's (STUDY.md §2); this file uses it for released rows (their gold graph) and `data.py
verify`. Text to token ids (our BPE, the original study's tokenizer, token shards and their loader) is
tokenizer.py's; this file uses it to build dataset directories. It imports common.py, tokenizer.py and
verifier.py.

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
import collections
import functools
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import asdict, dataclass, field

import common
from tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer, load_tokenizer, train_tokenizer, write_shards
from verifier import FORWARD, MODES, REVERSE, REWARDS, UNKNOWN_MARK, parse_solution, reward, verify_rows

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
# 3. Mixtures, problem streams and evaluation sets (STUDY.md §4, §5)

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
    # a wider tiny base (issue #28): 1-, 2- and 3-statement problems in distribution (op 2-6), 5% op 7-8
    'tiny_pretrain_wide': mixture([(0.95, range(2, 7)), (0.05, range(7, 9))], modes=['normalforward'],
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
    global _EXCLUDE
    if workers <= 1 or len(args) < 200:
        old, _EXCLUDE = _EXCLUDE, frozenset(exclude)
        try:
            return [fn(a) for a in common.progress_bar(args, desc=desc, disable=desc is None or len(args) < 5000)]
        finally:
            _EXCLUDE = old
    import multiprocessing as mp
    with mp.get_context('spawn' if sys.platform == 'darwin' else 'fork').Pool(
            workers, _init_worker, (frozenset(exclude),)) as pool:
        chunk = max(16, min(2000, len(args) // (workers * 8)))
        return list(common.progress_bar(pool.imap(fn, args, chunksize=chunk), total=len(args), desc=desc,
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
# 4. JSONL rows and training text

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


ROW_FIELDS = ('problem', 'question', 'solution')  # what every problem row holds (the released format's text)


def read_jsonl(path) -> list:
    """Rows of a JSONL file, or of every file of a directory / glob (jsonl_files). Released rows without
    'graph' / 'answer' get them from the gold solution; without op / template, from the file's name (else
    the template from the problem's place names); without mode, from the solution (reverse ones say the
    unknown is not known yet). The release's rows also carry 'depth' (the depth of the question's graph,
    which our generator does not write): read as an int where present and kept in the row. Every stage
    reads problem rows here, so a line that is not one (bad JSON, a missing ROW_FIELDS field, a solution
    without its answer) is one UsageError naming the file, the line and what to fix."""
    path = os.fspath(path)
    files = jsonl_files(path)
    if len(files) > 1 or files[0] != path:
        return [r for f in files for r in read_jsonl(f)]
    named = _row_defaults(path)
    with open(path, encoding='utf-8') as f:
        return [_read_row(f'{path} line {i + 1}', line, named) for i, line in enumerate(f) if line.strip()]


def _read_row(where, line, named) -> dict:
    """One line of a problem JSONL file as a complete row (see read_jsonl)."""
    fix = 'fix or remove that line, or point at a file of problem rows (the released format, data.py sample)'
    try:
        r = json.loads(line)
    except json.JSONDecodeError as e:
        raise common.UsageError(f"{where} is not valid JSON ({e.msg}); {fix}") from None
    missing = [k for k in ROW_FIELDS if not isinstance(r, dict) or not isinstance(r.get(k), str)]
    if missing:
        raise common.UsageError(f"{where}: the row has no {', '.join(map(repr, missing))} text (a problem row needs "
                                f"{', '.join(ROW_FIELDS)}); {fix}")
    r = {**named, **r}
    if 'mode' not in r:
        r['mode'] = REVERSE if UNKNOWN_MARK in r['solution'] else FORWARD
    if 'template' not in r:   # place names belong to one template each
        r['template'] = next((t.name for t in TEMPLATES.values()
                              if any(p in r['problem'] for ps in t.places for p in ps)), 'unknown')
    if r.get('depth') is not None:
        try:
            r['depth'] = int(r['depth'])
        except (TypeError, ValueError):
            raise common.UsageError(f"{where}: the row's 'depth' {r['depth']!r} is not an integer; {fix}") from None
    if 'answer' not in r:
        if 'Answer:' not in r['solution']:
            raise common.UsageError(f"{where}: the row's 'solution' has no final 'Answer: N'; {fix}")
        r['answer'] = answer_of(r['solution'])
    if 'graph' not in r:
        r['graph'] = parse_solution(r['solution'], r.get('mode'))
    if 'id' not in r or not isinstance(r['id'], str):   # released ids are hash(text) % 23
        r['id'] = problem_id(r['problem'], r['question'])
    return r


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
# 5. Dataset directories: held-out set, tokenizer, token shards (what every training stage reads)
#
# A dataset directory holds eval.jsonl (held-out problems), tokenizer.json, train_*.bin / val.bin
# (uint16 token streams) and meta.json (written last: a directory without it is incomplete).
# Every directory built with the default tokenizer shares one tokenizer identity, so a base model
# can be mid-trained or RL-trained on any other directory.

def standard_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """The project's tokenizer: BPE trained on a fixed seeded sample of every op (2..20), template and
    mode. Deterministic, so it has the same identity on every machine and in every dataset."""
    return _standard_tokenizer(int(vocab_size))


@functools.lru_cache(maxsize=None)
def _standard_tokenizer(vocab_size):
    problems = generate_problems(3000, MIXTURES['eval_all'], seed='tokenizer')
    return train_tokenizer([training_text(p.to_row()) for p in problems], vocab_size)


def resolve_tokenizer(tok=None) -> Tokenizer:
    """None -> the standard tokenizer; else tokenizer.load_tokenizer: a Tokenizer, a tokenizer.json
    path or a dataset directory."""
    return standard_tokenizer() if tok is None else load_tokenizer(tok)


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
    bar = common.progress_bar(desc=f'build {os.path.basename(os.path.normpath(out_dir))}', unit='doc')
    docs = _text_stream(mix, seed, workers, exclude, bar)
    meta = {'mixture': mix.to_dict(), 'seed': seed, 'eval_ops': list(eval_ops), 'eval_n': eval_n,
            'eval_seed': eval_seed, 'n_eval': len(held_out)}
    info = write_shards(docs, tok, out_dir, token_budget=int(token_budget), val_docs=val, meta=meta)
    bar.close()
    return info


def load_eval_rows(eval_file='', data_dir='', ops=tuple(range(2, 21)), per_op_template=67, templates=(),
                   modes=(), seed=1234, world='paper'):
    """The held-out problems as rows with gold graphs, filtered to `ops` / `templates` / `modes` and
    capped at per_op_template per (op, template) (0: no cap). Returns (rows, source: where they came
    from). eval_file: '' = {data_dir}/eval.jsonl when it exists (build_dataset's, disjoint from
    training), else generated with make_eval_set(ops, per_op_template, seed, modes, templates, world);
    'generate' = always generated; a path = read_jsonl's (a file, a directory or a glob). Every stage
    reads its held-out rows here (evaluate.py, rl.py)."""
    in_data_dir = os.path.join(data_dir, 'eval.jsonl') if data_dir else ''
    if eval_file and eval_file != 'generate':
        try:
            files = jsonl_files(eval_file)
        except ValueError as e:
            raise common.UsageError(f"eval_file: {e}, or --eval_file=generate") from None
        rows, source = read_jsonl(eval_file), eval_file + (f' ({len(files)} files)' if len(files) > 1 else '')
    elif eval_file != 'generate' and in_data_dir and os.path.exists(in_data_dir):
        rows, source = read_jsonl(in_data_dir), in_data_dir
    else:
        try:
            world = parse_world(world or 'paper')
        except ValueError as e:
            raise common.UsageError(str(e)) from None
        rows = [p.to_row() for p in make_eval_set(list(ops), per_op_template, seed, modes=modes or MODES,
                                                  templates=templates or None, world=world)]
        source = f"generated: make_eval_set(ops={list(ops)}, {per_op_template}, seed={seed}, {world})"
    ops, n_read = set(ops), len(rows)
    kept, per = [], collections.defaultdict(int)
    for r in rows:
        if r['op'] not in ops or (templates and r['template'] not in templates) or (modes and r['mode'] not in modes):
            continue
        if per_op_template and per[r['op'], r['template']] >= per_op_template:
            continue
        per[r['op'], r['template']] += 1
        kept.append(r)
    if not kept:
        raise common.UsageError(f"the eval set is empty: {n_read} rows in {source}, none with op in {sorted(ops)}, "
                                f"templates {list(templates) or 'any'}, modes {list(modes) or 'any'}; fix --eval_ops/"
                                f"--eval_templates/--eval_modes or point --eval_file at another set")
    return ensure_unique_ids(kept), source


def ensure_unique_ids(rows):
    """Ids key the generations. The original release's ids are hash(text) % 23 and collide, so rows with a
    missing or repeated id get the content hash (sha1 of problem + question, as Problem.id)."""
    seen = collections.defaultdict(int)
    for r in rows:
        seen[r.get('id')] += 1
    out = []
    for r in rows:
        if r.get('id') is None or seen[r['id']] > 1:
            r = dict(r, id=problem_id(r['problem'], r['question']))
        out.append(r)
    if len({r['id'] for r in out}) != len(out):
        raise common.UsageError("the eval set holds the same problem twice (same problem and question text); "
                                "deduplicate it")
    return out


# -----------------------------------------------------------------------------
# 6. Command line
#
# Every command parses --key=value with common.configure (typed defaults below; --help lists them);
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
    a = common.configure(SAMPLE_DEFAULTS, argv, presets=False)
    if not a.out:
        raise common.UsageError('sample needs --out=FILE.jsonl')
    if a.ops and a.mixture:
        raise common.UsageError('give --ops or --mixture, not both')
    if a.mixture and (a.templates or a.modes):
        raise common.UsageError('--templates/--modes go with --ops, not with --mixture')
    try:
        mix = parse_mixture(a.mixture) if a.mixture else mixture(a.ops or '2-20', a.templates or None,
                                                                a.modes or None)
    except ValueError as e:
        raise common.UsageError(str(e)) from None
    if a.n < 1 or a.workers < 1:
        raise common.UsageError('--n and --workers must be at least 1')
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir):
        raise common.UsageError(f"--out={a.out}: directory {out_dir} does not exist; create it first")
    problems = generate_problems(a.n, mix, a.seed, a.workers)
    write_jsonl(a.out, problems)
    print(f"wrote {len(problems)} problems to {a.out}")


def verify_main(argv) -> int:
    """python data.py verify --in=FILE.jsonl [--out=VERDICTS.jsonl]. Returns the exit status."""
    argv = list(argv)
    if argv and argv[0] == 'verify':
        argv = argv[1:]
    try:
        a = common.configure(VERIFY_DEFAULTS, argv, presets=False)
        inp, out = a['in'], a['out']
        if not inp:
            raise common.UsageError('missing --in=FILE.jsonl (rows with "graph" or "solution", and "prediction")')
        try:
            with open(inp, encoding='utf-8') as f:
                lines = f.readlines()
        except OSError as e:
            raise common.UsageError(f'cannot read --in={inp} ({e.strerror}); give an existing JSONL file') from None
        rows = []
        for i, line in enumerate(lines):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise common.UsageError(f'{inp} line {i + 1} is not valid JSON ({e.msg}); fix or remove '
                                            f'that line') from None
        try:
            verdicts, summary = verify_rows(rows)
        except ValueError as e:
            raise common.UsageError(f'{inp}: {e}') from None
    except common.UsageError as e:
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
    a = common.configure(BUILD_DEFAULTS, argv, presets=False)
    if not (a.out and a.mixture and a.tokens):
        raise common.UsageError('build needs --out=DIR --mixture=NAME_OR_OPS --tokens=N '
                                '(e.g. python data.py build --out=data/base --mixture=2-10 --tokens=5e6)')
    try:
        eval_ops = parse_ops(a.eval_ops)[0][1]
        mix = parse_mixture(a.mixture)
    except ValueError as e:
        raise common.UsageError(str(e)) from None
    info = build_dataset(a.out, mix, int(a.tokens), seed=a.seed, tokenizer=a.tokenizer or None, eval_ops=eval_ops,
                         eval_n=a.eval_n, eval_seed=a.eval_seed, val_n=a.val_n, workers=a.workers)
    print(f"wrote {a.out}: {info['splits']['train']['tokens']:,} train tokens, "
          f"{info['splits']['val']['tokens']:,} val tokens, {info['meta']['n_eval']} held-out problems, "
          f"tokenizer {info['tokenizer_identity'][:12]}")


def _tokenizer_main(argv):
    a = common.configure(TOKENIZER_DEFAULTS, argv, presets=False)
    if not a.out:
        raise common.UsageError('tokenizer needs --out=tokenizer.json (the standard tokenizer; --vocab_size=N '
                                'to change its size)')
    tok = standard_tokenizer(a.vocab_size)
    tok.save(a.out)
    print(f"wrote {a.out}: {tok}")


COMMANDS = {'sample': _sample_main, 'verify': lambda argv: sys.exit(verify_main(argv)), 'build': _build_main,
            'tokenizer': _tokenizer_main}



if __name__ == '__main__':
    common.cli('data.py', COMMANDS)  # one usage line lists the commands
