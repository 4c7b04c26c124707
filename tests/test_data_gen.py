"""Tests of the task-world generator, mixtures and datasets (data.py sections 1-5, STUDY.md §1).

The central check is an independent TEXT solver (below): it reads only the problem and question
strings (regexes over the statement grammar; a total is the sum of every stated instance parameter of
its place; reverse mode carries linear forms a*x + b) and must reproduce the generator's answer and
every gold node value. It also runs on the original's 114 samples, where it finds the original's
ill-posed reverse problems; ours must have none.
"""
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402
import data  # noqa: E402

FIXTURE = os.path.join(ROOT, 'reference', 'official_generator_samples.jsonl')
FIXTURE_ROWS = [json.loads(line) for line in open(FIXTURE)]
FWD, REV = 'normalforward', 'forwardreverse'
ALL_OPS = list(range(2, 21))


def gen_rows(mixture, n, **kw):
    """n JSONL rows of a mixture (data.generate_problems as rows)."""
    return [p.to_row() for p in data.generate_problems(n, mixture, **kw)]


# ------------------------------------------------------------------------------------------------
# An independent solver of the problem TEXT (knows the grammar, nothing of the generator)

class IllPosed(Exception):
    pass


_STMT = re.compile(r'^The (?:number of (?P<inst>.+?)|(?P<tot>total number of .+?)) '
                   r'(?:equals (?P<rhs>.+)|(?P<exists>exists, and its number is greater than 0))$')
_CONST_OP = re.compile(r'^(\d+) (plus|times) (.+)$')


def _ref(s):
    if s.startswith('the number of '):
        return s[len('the number of '):]
    if s.startswith('the total number of '):
        return s[len('the '):]
    raise IllPosed(f'not a parameter reference: {s!r}')


def _rhs(s):
    """'3' | [c plus|times] (ref | the sum of A and B | A, B, and C | the difference between A and B)
    -> (const op or None, const, combine, [names])."""
    if s.isdigit():
        return None, int(s), 'const', []
    op, c = None, None
    m = _CONST_OP.match(s)
    if m:
        op, c, s = m.group(2), int(m.group(1)), m.group(3)
    if s.startswith('the sum of '):
        body = s[len('the sum of '):]
        if ', and ' in body:
            head, last = body.rsplit(', and ', 1)
            refs = head.split(', ') + [last]
        else:
            refs = body.split(' and ')
        if not 2 <= len(refs) <= 4 or (len(refs) == 2 and ', ' in body):
            raise IllPosed(f'bad sum: {s!r}')
        return op, c, 'sum', [_ref(r) for r in refs]
    if s.startswith('the difference between '):
        refs = s[len('the difference between '):].split(' and ')
        if len(refs) != 2:
            raise IllPosed(f'bad difference: {s!r}')
        return op, c, 'diff', [_ref(r) for r in refs]
    return op, c, 'ref', [_ref(s)]


def parse_problem(problem):
    if not problem.endswith('. '):
        raise IllPosed('problem does not end with ". "')
    defs, exists, observed = {}, [], []
    for st in problem[:-2].split('. '):
        m = _STMT.match(st)
        if not m:
            raise IllPosed(f'not a statement: {st!r}')
        name = m.group('inst') or m.group('tot')
        if m.group('exists'):
            exists.append(name)
            continue
        r = _rhs(m.group('rhs'))
        if m.group('tot'):                       # totals are implied; a stated one is an observation
            if r[2] != 'const':
                raise IllPosed(f'a total defined by an expression: {st!r}')
            observed.append((name, r[1]))
        else:
            defs.setdefault(name, []).append(r)
    return defs, exists, observed


def solve_text(problem, question, lenient=False):
    """(answer, {name: value}) from the text alone; value = int (forward) or (a, b) = a*x + b (reverse).
    Raises IllPosed when the text does not determine the answer. lenient: read a repeated "exists"
    sentence as one (the original's defect) and see whether the text still determines the answer."""
    defs, exists, observed = parse_problem(problem)
    if lenient:
        exists = sorted(set(exists))
    if len(exists) != len(set(exists)):
        raise IllPosed(f'duplicate "exists" statement for {exists}')
    reverse = bool(exists)
    if len(exists) > 1:
        raise IllPosed(f'{len(exists)} unknowns')
    for name, rs in list(defs.items()):
        if len(rs) == 1:
            continue
        # reverse mode: an instance parameter can have its definition plus the observed value
        consts = [r for r in rs if r[2] == 'const']
        if not reverse or len(rs) != 2 or len(consts) != 1:
            raise IllPosed(f'{name} is defined {len(rs)} times')
        observed.append((name, consts[0][1]))
        defs[name] = [r for r in rs if r[2] != 'const']
    unknown = exists[0] if reverse else None
    if unknown is not None and unknown in defs:
        raise IllPosed(f'the unknown {unknown} is also defined')
    members = {}                                 # place -> stated instance parameters
    for name in list(defs) + exists:
        item, place = name.split(' in ', 1)
        members.setdefault(place, []).append(name)
    memo, active = {}, set()

    def value(name):                             # (a, b) = a*x + b
        if name in memo:
            return memo[name]
        if name in active:
            raise IllPosed(f'cycle through {name}')
        active.add(name)
        if name == unknown:
            v = (1, 0)
        elif name.startswith('total'):
            place = name.split(' in ', 1)[1]
            if place not in members:
                raise IllPosed(f'{name}: no instance parameter of {place} is stated')
            vs = [value(n) for n in members[place]]
            v = (sum(a for a, _ in vs), sum(b for _, b in vs))
        elif name in defs:
            op, c, comb, refs = defs[name][0]
            if comb == 'const':
                v = (0, c)
            else:
                vs = [value(n) for n in refs]
                if comb == 'diff':
                    v = (vs[0][0] - vs[1][0], vs[0][1] - vs[1][1])
                else:
                    v = (sum(a for a, _ in vs), sum(b for _, b in vs))
                if op == 'plus':
                    v = (v[0], v[1] + c)
                elif op == 'times':
                    v = (v[0] * c, v[1] * c)
        else:
            raise IllPosed(f'{name} is never defined')
        active.discard(name)
        memo[name] = v
        return v

    m = re.match(r'^How many (.+) does (.+) have\?$', question) or re.match(r'^What is the (total number of .+)\?$',
                                                                            question)
    if not m:
        raise IllPosed(f'bad question {question!r}')
    target = f'{m.group(1)} in {m.group(2)}' if question.startswith('How') else m.group(1)
    if not reverse:
        if observed:
            raise IllPosed('an observation in a forward problem')
        a, b = value(target)
        return b, {n: memo[n][1] for n in memo}
    if target != unknown:
        raise IllPosed(f'reverse question asks {target}, the unknown is {unknown}')
    if len(observed) != 1:
        raise IllPosed(f'{len(observed)} observations')
    name, v = observed[0]
    a, b = value(name)
    if a == 0 or (v - b) % a or (v - b) // a < 1:
        raise IllPosed(f'{name}: {a}*x + {b} = {v} has no unique positive integer root')
    return (v - b) // a, dict(memo)


def check_solver_agrees(p):
    """The text alone gives the generator's answer and every gold node value."""
    ans, vals = solve_text(p.problem, p.question)
    assert ans == p.answer, (p.problem, p.question, p.solution)
    for name, node in p.graph['nodes'].items():
        got = vals[name]
        want = tuple(node['value']) if p.mode == REV else node['value']
        assert got == want, (name, got, want, p.problem)


# ------------------------------------------------------------------------------------------------
# The text grammar of the original (the fixture must match it too)

_L = r'[A-Za-z]'
_N = r'\d+'
_E = r'(?:(?:\d+\*)?x(?: [+-] \d+)?|\d+)'          # a printed linear form: 'x', '2*x + 4', 'x - 2', '5'
_FWD_CLAUSES = [re.compile(p) for p in (
    rf'so {_L} = {_N}',                                                     # leaf
    rf'(?:so )?{_L} = {_L} = {_N}',                                         # copy / scratch copy
    rf'(?:so )?{_L} = {_L} ([+-]) {_L} = {_N} \1 {_N} = {_N}',              # sum / difference
    rf'so {_L} = {_N} ([+*]) {_L} = {_N} \1 {_N} = {_N}')]                  # constant plus / times
_REV_CLAUSES = [re.compile(p) for p in (
    rf'so {_L} = {_N}',
    rf'(?:so )?{_L} = {_L} = {_E}',
    rf'(?:so )?{_L} = {_L} \+ {_L} = {_E} \+ {_E} = {_E}',
    rf'(?:so )?{_L} = {_L} - {_L} = \({_E}\) - \({_E}\) = {_E}',
    rf'so {_L} = {_N} \+ {_L} = {_N} \+ {_E} = {_E}',
    rf'so {_L} = {_N} \* {_L} = \({_N}\) \* \({_E}\) = {_E}')]
_CLOSING = re.compile(rf'We know ({_L}) = ({_N}), so we have ({_E}) = \2 and we solve it through the following steps: '
                      rf'Simplifying the equation: \3 = \2\. Move all terms to one side: ({_E}) = 0\. '
                      rf'Isolate the term with x: ({_N})\*x = ({_N})\. Divide both sides by \5: x = \6 / \5\. '
                      rf'Solution: x = ({_N})\. Answer: \7\.$')
_UNKNOWN_STEP = "we don't know its value yet but will find it out later"
_REV_PREFIX = 'The question is difficult, so we use equations to solve it. '
_QUESTION = re.compile(r'^(?:How many (.+) does (.+) have|What is the (total number of .+) in (.+))\?$')


def _arith_ok(clause):
    """Forward arithmetic inside a clause: 'a + b = c', 'c * a = v', ..."""
    m = re.search(r'= (\d+) ([-+*]) (\d+) = (\d+)$', clause)
    if not m:
        return True
    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    return {'+': a + b, '-': a - b, '*': a * b}[op] == c


def names_ok(name, template):
    tpl = data.TEMPLATES[template]
    head, place = name.split(' in ', 1)
    places = {p for sub in tpl.places for p in sub}
    items = {i for sub in tpl.items for i in sub}
    return place in places and (head in items or head == tpl.total)


def grammar_errors(row):
    """A list of what in the row does not follow the original's grammar (empty = fine)."""
    errs = []
    prob, q, sol, mode, template = row['problem'], row['question'], row['solution'], row['mode'], row['template']
    if not prob.endswith('. '):
        errs.append('problem end')
    for st in prob[:-2].split('. '):
        m = _STMT.match(st)
        if not m:
            errs.append(f'statement {st!r}')
            continue
        try:
            refs = _rhs(m.group('rhs'))[3] if m.group('rhs') else []
        except IllPosed as e:
            errs.append(str(e))
            continue
        for n in [m.group('inst') or m.group('tot')] + refs:
            if not names_ok(n, template):
                errs.append(f'name {n!r}')
    if not _QUESTION.match(q):
        errs.append(f'question {q!r}')
    reverse = mode == REV
    body = sol
    if reverse:
        if not body.startswith(_REV_PREFIX):
            errs.append('reverse prefix')
        body = body[len(_REV_PREFIX):]
        k = body.find('We know ')
        closing, body = body[k:], body[:k]
        m = _CLOSING.match(closing)
        if not m:
            errs.append(f'closing {closing!r}')
    else:
        k = body.rfind('Answer: ')
        if not re.fullmatch(r'Answer: \d+\.', body[k:]):
            errs.append('answer')
        body = body[:k]
    steps = re.findall(r'Define (.+?) as ([A-Za-z]); (.*?)\. (?=Define |We know |Answer: |$)', body)
    if ''.join(f'Define {n} as {v}; {t}. ' for n, v, t in steps) != body:
        errs.append('steps do not tile the solution')
    lhs = []
    for name, letter, text in steps:
        if not names_ok(name, template):
            errs.append(f'name {name!r}')
        if reverse and text == _UNKNOWN_STEP:
            if letter != 'x':
                errs.append('unknown letter')
            continue
        clauses = text.split('; ')
        if [c.startswith('so ') for c in clauses] != [False] * (len(clauses) - 1) + [True]:
            errs.append(f'"so" placement: {text!r}')
        for c in clauses:
            pats = _REV_CLAUSES if reverse else _FWD_CLAUSES
            if not any(p.fullmatch(c) for p in pats):
                errs.append(f'clause {c!r}')
            elif not reverse and not _arith_ok(c):
                errs.append(f'arithmetic {c!r}')
            lhs.append(c[3:4] if c.startswith('so ') else c[0])
        if clauses[-1][3:4] != letter:
            errs.append(f'step letter {letter} is not defined by its last clause')
    if reverse and ('x' in lhs or 'X' in lhs):
        errs.append('x or X used as a variable in reverse mode')
    if len(lhs) != len(set(lhs)) and not any(e.startswith('clause') for e in errs):
        errs.append('a letter is defined twice')
    return errs


# ------------------------------------------------------------------------------------------------
# Shared samples (generated once per session: ~1 s)

@pytest.fixture(scope='module')
def sample():
    """~3000 problems over op 2..20, both modes, all templates."""
    return data.generate_problems(3040, ALL_OPS, seed=11)


# --- the fixture ---------------------------------------------------------------------------------

@pytest.mark.fast
def test_fixture_follows_the_grammar():
    bad = {i: grammar_errors(r) for i, r in enumerate(FIXTURE_ROWS)}
    assert not any(bad.values()), {i: e for i, e in bad.items() if e}


def test_text_solver_on_the_original_samples_finds_its_ill_posed_reverse_problems():
    ill, wrong = [], []
    for i, r in enumerate(FIXTURE_ROWS):
        gold = data.answer_of(r['solution'])
        try:
            ans, _ = solve_text(r['problem'], r['question'])
        except IllPosed as e:
            assert r['mode'] == REV, (e, r)          # every forward sample is well-posed
            ill.append(i)
            continue
        assert ans == gold, r
        assert solve_text(r['problem'], r['question'], lenient=True)[0] == gold
    # The original's defect (STUDY.md §1): a definition replaced by a duplicate "exists" sentence. Read
    # leniently (the duplicate as one sentence), most of these still have no answer, or a different one
    # (the lost instance parameter no longer counts in its place's total).
    for i in ill:
        r = FIXTURE_ROWS[i]
        try:
            if solve_text(r['problem'], r['question'], lenient=True)[0] != data.answer_of(r['solution']):
                wrong.append(i)
        except IllPosed:
            wrong.append(i)
    n_rev = sum(r['mode'] == REV for r in FIXTURE_ROWS)
    print(f'original samples: {len(ill)} of {n_rev} reverse problems ill-posed, {len(wrong)} of them have no '
          f'answer or a different one from the text')
    assert 5 <= len(ill) <= n_rev // 2 and len(wrong) >= len(ill) // 2, (ill, wrong)


# --- our text ------------------------------------------------------------------------------------

def test_our_problems_follow_the_grammar(sample):
    for p in sample:
        errs = grammar_errors(p.to_row())
        assert not errs, (errs, p.problem, p.question, p.solution)


def test_every_answer_follows_from_the_text_alone(sample):
    for p in sample:
        check_solver_agrees(p)


@pytest.mark.slow
def test_every_answer_follows_from_the_text_alone_large():
    """40k problems, op 2..40, every template and mode."""
    for p in data.generate_problems(40000, list(range(2, 41)), seed=99, workers=2):
        check_solver_agrees(p)
        assert not grammar_errors(p.to_row())


@pytest.mark.fast
def test_solver_rejects_an_ill_posed_problem(sample):
    """The solver is not vacuous: drop or duplicate a needed statement and it refuses."""
    p = next(p for p in sample if p.mode == REV and p.op >= 8)
    sts = p.problem[:-2].split('. ')
    unknown = next(s for s in sts if s.endswith('greater than 0'))
    needed = next(s for s in sts if s.split(' equals ')[0][len('The number of '):] in p.graph['order'][-3:-1]
                  and ' equals ' in s)
    replaced = [unknown if s == needed else s for s in sts]      # the original's defect
    with pytest.raises(IllPosed):
        solve_text('. '.join(replaced) + '. ', p.question)
    with pytest.raises(IllPosed):
        solve_text('. '.join(s for s in sts if s != needed) + '. ', p.question)


# --- gold graphs ---------------------------------------------------------------------------------

def test_gold_graph_invariants(sample):
    for p in sample:
        g = p.graph
        assert g['mode'] == p.mode and g['answer'] == p.answer == data.answer_of(p.solution)
        assert data.graph_op(g) == p.op                  # op computed from the graph = requested op
        assert list(g['nodes']) == g['order'] == re.findall(r'Define (.+?) as [A-Za-z];', p.solution)
        seen = set()
        for name in g['order']:
            nd = g['nodes'][name]
            assert set(nd['parents']) <= seen and nd['parents'] == sorted(nd['parents'])
            seen.add(name)
            if name.startswith('total'):                 # a total sums every instance parameter of its place
                place = name.split(' in ', 1)[1]
                stated = set(re.findall(r'The number of ([^.]+? in ' + re.escape(place) + r') (?:equals|exists)',
                                        p.problem))
                assert set(nd['parents']) == stated, (name, p.problem)
        # every node feeds the question: all are its ancestors
        anc, stack = set(), [g['order'][-1]]
        while stack:
            n = stack.pop()
            if n not in anc:
                anc.add(n)
                stack += g['nodes'][n]['parents']
        assert anc == set(g['order'])
        if p.mode == FWD:
            assert g['unknown'] is None and g['known'] is None
            assert all(1 <= nd['value'] <= data.VMAX for nd in g['nodes'].values())
            assert p.question.startswith('What' if g['order'][-1].startswith('total') else 'How')
        else:
            x = p.answer
            assert 1 <= x <= 4
            assert g['nodes'][g['unknown']] == {'parents': [], 'value': [1, 0]}
            assert g['known'] == {'name': g['order'][-1], 'value': g['nodes'][g['order'][-1]]['value'][0] * x
                                  + g['nodes'][g['order'][-1]]['value'][1]}
            for nd in g['nodes'].values():
                a, b = nd['value']
                assert a >= 0 and 1 <= a * x + b <= data.VMAX
            assert g['nodes'][g['order'][-1]]['value'][0] > 0       # x is recoverable
            assert p.question == 'How many %s does %s have?' % tuple(g['unknown'].split(' in ', 1))
            letters = re.findall(r'(?:Define .+? as |; |so )([A-Za-z]) = ', p.solution)
            assert 'x' not in letters and 'X' not in letters


@pytest.mark.fast
def test_requested_op_and_ranges_beyond_training():
    rng = random.Random(0)
    for op in (2, 3, 21, 25, 30, 40):
        for mode in data.MODES:
            p = data.generate(rng, op, 'movie_festival_awards', mode)
            assert p.op == op == data.graph_op(p.graph)
            check_solver_agrees(p)
    p = data.generate(rng, [5, 9], 'teachers_in_school', FWD)
    assert p.op in (5, 9)
    for bad in (dict(ops=1, template='crazy_zootopia', mode=FWD), dict(ops=41, template='crazy_zootopia', mode=FWD),
                dict(ops=5, template='zoo', mode=FWD), dict(ops=5, template='crazy_zootopia', mode='forward')):
        with pytest.raises(ValueError):
            data.generate(rng, **bad)


def test_noise_never_changes_the_answer(sample):
    """Deleting any single noise statement leaves the answer and gold values unchanged."""
    for p in sample[:400]:
        sts = p.problem[:-2].split('. ')
        on_path = set(p.graph['order'])
        for s in sts:
            name = _STMT.match(s)
            name = name.group('inst') or name.group('tot')
            if name in on_path:
                continue
            # a noise parameter may be part of an unused total; only the answer matters
            ans, _ = solve_text('. '.join(t for t in sts if t != s) + '. ', p.question)
            assert ans == p.answer


def test_value_and_size_distribution_close_to_the_original(sample):
    s = bench.size_stats(data.generate_problems(2000, sorted(data.REFERENCE_SIZES), seed=5))
    for op, (pchars, schars, steps, rschars) in data.REFERENCE_SIZES.items():
        f, r = s[FWD, op], s[REV, op]
        assert abs(f[1] - schars) < 0.15 * schars, (op, f, schars)
        assert abs(r[1] - rschars) < 0.15 * rschars, (op, r, rschars)
        assert abs(f[3] - steps) < 0.25 * steps + 0.3, (op, f, steps)
        assert pchars / 1.6 < f[0] < pchars * 1.6, (op, f, pchars)
    # leaves and "plus" constants uniform 1..4, "times" constants 2..4
    leaves, plus, times = Counter(), Counter(), Counter()
    for p in sample:
        if p.mode == FWD:
            leaves.update(int(v) for v in re.findall(r'as [A-Za-z]; so [A-Za-z] = (\d+)\. ', p.solution))
        plus.update(int(c) for c in re.findall(r'(\d+) plus ', p.problem))
        times.update(int(c) for c in re.findall(r'(\d+) times ', p.problem))
    assert set(leaves) == set(plus) == {1, 2, 3, 4} and set(times) == {2, 3, 4}
    assert min(leaves.values()) > 0.15 * sum(leaves.values())
    # about half forward, a third per template
    modes, templates = Counter(p.mode for p in sample), Counter(p.template for p in sample)
    assert all(abs(v / len(sample) - 0.5) < 0.04 for v in modes.values())
    assert all(abs(v / len(sample) - 1 / 3) < 0.04 for v in templates.values())


# --- determinism and ids -------------------------------------------------------------------------

def test_same_seed_same_problems_any_worker_count():
    mix = data.MIXTURES['eval_all']
    one = gen_rows(mix, 400, seed=3, workers=1)
    two = gen_rows(mix, 400, seed=3, workers=2)
    assert one == two
    assert gen_rows(mix, 50, seed=4)[:5] != one[:5]
    # problem i depends on (seed, i) only: a longer run starts with the shorter one
    assert gen_rows(mix, 30, seed=3) == one[:30]


@pytest.mark.fast
def test_ids_are_stable_content_hashes():
    p = data.generate_problems(1, [7], seed=0)[0]
    import hashlib
    assert p.id == hashlib.sha1((p.problem + p.question).encode()).hexdigest()[:16]
    assert data.problem_id(p.problem, p.question) == p.id
    # pinned: the same seed gives the same problems on any machine (update only on purpose)
    ids = [q.id for q in data.generate_problems(40, ALL_OPS, seed=0)]
    digest = hashlib.sha1(' '.join(ids).encode()).hexdigest()[:12]
    assert digest == PINNED_DIGEST, digest


PINNED_DIGEST = '649de75488b6'


# --- mixtures and datasets -----------------------------------------------------------------------

def _draw(mix, n, seed=0):
    rng = random.Random(seed)
    return [mix.sample(rng) for _ in range(n)]


@pytest.mark.fast
def test_mixture_proportions():
    n = 25000
    d = _draw(data.MIXTURES['headroom_.5/.3/.2'], n)
    band = Counter('easy' if op <= 4 else 'medium' if op <= 7 else 'hard' for op, _, _ in d)
    assert abs(band['easy'] / n - .5) < .02 and abs(band['medium'] / n - .3) < .02 and abs(band['hard'] / n - .2) < .02
    assert {op for op, _, _ in d} == set(range(2, 11))
    d = _draw(data.MIXTURES['mid_11_14'], n)
    assert abs(sum(op >= 11 for op, _, _ in d) / n - 0.8) < 0.015 and {op for op, _, _ in d} == set(range(2, 15))
    d = _draw(data.MIXTURES['mid_9_12'], n)
    # 0.2*U(2..10) + 0.8*U(9..12): P(op in 9..10) = 0.2*2/9 + 0.8*2/4
    assert abs(sum(op in (9, 10) for op, _, _ in d) / n - (0.2 * 2 / 9 + 0.4)) < 0.015
    d = _draw(data.MIXTURES['pretrain_uniform'], n)
    ops, modes, tpls = Counter(o for o, _, _ in d), Counter(m for _, _, m in d), Counter(t for _, t, _ in d)
    assert all(abs(c / n - 1 / 9) < 0.01 for c in ops.values()) and len(ops) == 9
    assert all(abs(c / n - 0.5) < 0.015 for c in modes.values())
    assert all(abs(c / n - 1 / 3) < 0.015 for c in tpls.values())
    d = _draw(data.MIXTURES['ctx_school_1pct'], n)
    assert abs(sum(t == 'teachers_in_school' for _, t, _ in d) / n - 0.01) < 0.003
    assert {t for _, t, _ in d} == {'crazy_zootopia', 'teachers_in_school'}
    d = _draw(data.MIXTURES['ctx_school_op2_only'], n)
    school = [op for op, t, _ in d if t == 'teachers_in_school']
    assert school and set(school) == {2} and abs(len(school) / n - 0.01) < 0.003
    assert {op for op, t, _ in d if t == 'crazy_zootopia'} == set(range(2, 11))
    assert {t for _, t, _ in _draw(data.MIXTURES['ctx_school_0pct'], 2000)} == {'crazy_zootopia'}
    d = _draw(data.mixture('2-5', modes=['normalforward'], templates={'movie_festival_awards': 1}), 1000)
    assert {(t, m) for _, t, m in d} == {('movie_festival_awards', FWD)}


@pytest.mark.fast
def test_every_spec_mixture_is_named():
    names = set(data.MIXTURES)
    for want in ('pretrain_uniform', 'mid_11_14', 'mid_9_12', 'rl_7_10', 'rl_9_12', 'rl_11_14', 'rl_17_20',
                 'ctx_school_0pct', 'ctx_school_0.1pct', 'ctx_school_1pct', 'ctx_school_10pct', 'ctx_school_op2_only',
                 'headroom_uniform', 'headroom_.5/.3/.2', 'headroom_.2/.3/.5', 'headroom_.4995/.4995/.001',
                 'headroom_.495/.495/.01', 'headroom_.475/.475/.05', 'headroom_.4/.4/.2', 'headroom_.25/.25/.5'):
        assert want in names, want
    for m in data.MIXTURES.values():                     # JSON round trip (stored in shard meta.json)
        assert data.Mixture.from_dict(json.loads(json.dumps(m.to_dict()))) == m


@pytest.mark.fast
def test_parse_mixture_strings():
    m = data.parse_mixture('2-10')
    assert m.ops == ((1.0, tuple(range(2, 11))),) and m == data.MIXTURES['pretrain_uniform']
    m = data.parse_mixture('2-4:0.5,5-7:0.3,8-10:0.2')
    assert m == data.MIXTURES['headroom_.5/.3/.2']
    assert data.parse_mixture('2-4,8').ops == ((1.0, (2, 3, 4, 8)),)
    assert data.parse_mixture('mid_11_14') is data.MIXTURES['mid_11_14']
    for bad in ('2-x', '5-3', '2-4:0.5,6-8', '', 'nonsense', '0-4', '2-60'):
        with pytest.raises(ValueError):
            data.parse_mixture(bad)


def test_generated_rows_follow_the_mixture():
    rows = gen_rows('headroom_.5/.3/.2', 1500, seed=2)
    band = Counter('e' if r['op'] <= 4 else 'm' if r['op'] <= 7 else 'h' for r in rows)
    assert abs(band['e'] / 1500 - .5) < .05 and abs(band['h'] / 1500 - .2) < .05
    assert set(rows[0]) == {'problem', 'question', 'solution', 'op', 'id', 'template', 'mode', 'answer', 'graph'}


def test_training_never_overlaps_the_eval_set():
    ev = data.make_eval_set([2], 40, seed=5)
    ids = {p.id for p in ev}
    naive = gen_rows('2', 2000, seed=0)
    hits = [i for i, r in enumerate(naive) if r['id'] in ids]
    assert hits, 'op 2 is small: collisions expected, else this test proves nothing'
    train = gen_rows('2', 2000, seed=0, exclude_ids=ids)
    assert not ids & {r['id'] for r in train}
    # exclusion re-draws exactly the colliding rows and leaves the others as they were
    assert [i for i, (a, b) in enumerate(zip(naive, train)) if a != b] == hits


@pytest.mark.fast
def test_eval_set_layout():
    ev = data.make_eval_set([3, 12], 6, seed=1)
    c = Counter((p.op, p.template, p.mode) for p in ev)
    assert len(c) == 2 * 3 * 2 and set(c.values()) == {3}
    assert len({p.id for p in ev}) == len(ev)
    assert [p.id for p in data.make_eval_set([3, 12], 6, seed=1)] == [p.id for p in ev]
    assert {p.mode for p in data.make_eval_set([4], 2, seed=1, modes=[FWD])} == {FWD}


# --- rows, files, training text ------------------------------------------------------------------

@pytest.mark.fast
def test_jsonl_round_trip_and_released_rows(tmp_path):
    rows = gen_rows('2-6', 20, seed=1)
    path = tmp_path / 'x.jsonl'
    data.write_jsonl(path, rows)
    assert data.read_jsonl(path) == rows
    released = tmp_path / 'released.jsonl'
    with open(released, 'w') as f:
        for r in FIXTURE_ROWS[:5]:
            f.write(json.dumps(dict(r, id=7)) + '\n')
    if hasattr(data, 'parse_solution'):
        back = data.read_jsonl(released)
        assert [r['answer'] for r in back] == [data.answer_of(r['solution']) for r in FIXTURE_ROWS[:5]]
        assert all(isinstance(r['graph'], dict) and len(r['id']) == 16 for r in back)
    else:
        with pytest.raises(NotImplementedError, match='parse_solution'):
            data.read_jsonl(released)


@pytest.mark.fast
def test_training_and_prompt_text():
    r = FIXTURE_ROWS[0]
    assert data.training_text(dict(r, answer=2)) == (
        '<question> The number of adult fox in Cedar Valley equals 2. The number of adult bear in Beverly Forest '
        'equals 4. What is the total number of adult animals in Cedar Valley? </question> <solution> Define adult '
        'fox in Cedar Valley as J; so J = 2. Define total number of adult animals in Cedar Valley as x; so x = J = 2. '
        '</solution> <answer> 2 </answer>')
    assert data.training_text(r) == data.training_text(dict(r, answer=2))      # answer read from the solution
    p = data.generate_problems(1, data.mixture([9], modes=[REV]), seed=3)[0].to_row()
    t = data.training_text(p)
    assert t.startswith(data.prompt_text(p)) and data.prompt_text(p).endswith(' <solution>')
    assert t.endswith(f"Solution: x = {p['answer']}. </solution> <answer> {p['answer']} </answer>")
    assert 'Answer:' not in t


# --- command line and speed ----------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'data.py'), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_sample_and_errors(tmp_path):
    out = tmp_path / 's.jsonl'
    r = _cli('sample', '--ops=2-5', '--n=30', '--seed=0', f'--out={out}', '--templates=teachers_in_school',
             '--modes=normalforward')
    assert r.returncode == 0, r.stderr
    rows = data.read_jsonl(out)
    assert len(rows) == 30 and {(x['template'], x['mode']) for x in rows} == {('teachers_in_school', FWD)}
    assert {x['op'] for x in rows} <= {2, 3, 4, 5}
    for args in (['sample', '--ops=2-x', f'--out={out}'], ['sample', '--n=5'], ['sample', '--bogus=1', f'--out={out}'],
                 ['sample', '--templates=zoo', f'--out={out}'], ['frobnicate'], ['sample', '--n=abc', f'--out={out}'], ['sample', 'stray']):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith('data.py: ')


@pytest.mark.fast
def test_bench_generate_runs():
    assert bench.bench_generate(seconds=0.3) > 200


@pytest.mark.slow
def test_generation_speed():
    rate = bench.bench_generate(seconds=3)
    print(f'problems/s (one core, op 2..20): {rate:.0f}')
    assert rate > 1000


# --- smaller worlds (data.World) -----------------------------------------------------------------

def test_paper_world_is_unchanged_by_the_world_knob():
    """The default world draws exactly what the generator drew before World existed (hash of 300
    problems, op 2-20, both modes, computed with the generator of commit 2cfd73f)."""
    import hashlib
    h = hashlib.sha256()
    for p in data.generate_problems(300, data.mixture(range(2, 21)), seed=7):
        h.update((p.problem + p.question + p.solution).encode())
    assert h.hexdigest() == 'e800f45a52e66ee81b381727650a471ec5d048f43f8f7c731fcaf592a9285d94'


@pytest.mark.fast
def test_small_world_uses_only_its_names_and_stays_solvable():
    world = data.World(places=3, items=3, noise=0.5)
    allowed = {t.name: ({p for sub in t.places for p in sub[:3]}, {i for sub in t.items for i in sub[:3]})
               for t in data.TEMPLATES.values()}
    mix = data.mixture(range(2, 11), modes=[FWD, REV], world=world)
    for p in data.generate_problems(150, mix, seed=3):
        places, items = allowed[p.template]
        for name in p.graph['nodes']:
            item, _, place = name.rpartition(' in ')
            assert place in places and (item in items or item.startswith('total')), name
        check_solver_agrees(p)
    assert data.parse_mixture(mix.to_dict()) == mix  # the world survives meta.json
    assert 'world' not in data.mixture('2-4').to_dict()  # paper-world metadata unchanged


@pytest.mark.fast
def test_world_noise_scales_the_distractor_statements():
    def statements(noise):
        mix = data.mixture([6], modes=[FWD], world=data.World(5, 5, noise))
        ps = data.generate_problems(200, mix, seed=1)
        extra = [p.problem.count('. ') - sum(1 for nd in p.graph['nodes'] if not nd.startswith('total'))
                 for p in ps]
        return sum(extra) / len(extra)
    none, half, full = statements(0.0), statements(0.5), statements(1.0)
    assert none == 0 and 0 < half < full


@pytest.mark.fast
def test_parse_world_names_and_errors():
    assert data.parse_world('tiny') == data.WORLDS['tiny']
    assert data.parse_world('4,2,0.25') == data.World(4, 2, 0.25)
    for bad in ('huge', '3,3', '0,3,1'):
        with pytest.raises(ValueError, match='world'):
            data.parse_world(bad)


def test_given_statements_counts_what_the_text_states(sample):
    # forward mode: every statement (stated gold nodes -- totals are implied -- and distractors)
    # starts with a capitalised "The number of", and every non-total gold node is stated
    assert data.given_statements(FIXTURE_ROWS[0]['problem']) == 2
    forward = [p.to_row() for p in sample if p.mode == 'normalforward']
    assert len(forward) > 500
    for r in forward:
        n = data.given_statements(r['problem'])
        assert n == r['problem'].count('The number of'), r['problem']
        assert n >= sum(1 for name in r['graph']['nodes'] if not name.startswith('total number')), r['id']
