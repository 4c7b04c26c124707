"""Tests of the solution parser, the graph verifier and the RL rewards (STUDY.md §2)."""
import json
import os
import random
import re
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import bench_verify  # noqa: E402
from data import verify_main  # noqa: E402
from verifier import REWARDS, Verdict, _linear_form, parse_solution, reward, verify, verify_rows  # noqa: E402

FIXTURE = os.path.join(ROOT, 'reference', 'official_generator_samples.jsonl')
ROWS = [json.loads(line) for line in open(FIXTURE)]
REV = 'forwardreverse'


def as_model_output(solution, answer):
    """What a model writes after <solution> (STUDY.md §1, training text)."""
    k = solution.rfind('Answer:')
    return '%s </solution> <answer> %s </answer>' % (solution[:k].strip(), answer)


def gold_of(row):
    return parse_solution(row['solution'])


def counts(v):
    return (v.correct, v.missing, v.extra, v.value_errors, v.parent_errors, v.answer_error)


# --- reading the fixture -------------------------------------------------------------------------

@pytest.mark.fast
def test_fixture_graphs_are_well_formed():
    for row in ROWS:
        g = gold_of(row)
        assert g['mode'] == row['mode']
        assert g['order'] == list(g['nodes']) and len(g['order']) == row['solution'].count('Define ')
        assert g['answer'] == int(row['solution'].rsplit('Answer: ', 1)[1].rstrip('.'))
        last = g['nodes'][g['order'][-1]]
        if row['mode'] == REV:
            u = g['unknown']
            assert g['nodes'][u] == {'parents': [], 'value': [1, 0]}
            assert g['known']['name'] == g['order'][-1]          # "We know" names the question's target
            a, b = last['value']
            assert a * g['answer'] + b == g['known']['value']  # the unknown solves the equation
            for n in g['order']:
                assert isinstance(g['nodes'][n]['value'], list)
        else:
            assert g['unknown'] is None and g['known'] is None
            assert last['value'] == g['answer']
            for n in g['order']:
                assert isinstance(g['nodes'][n]['value'], int)
        for n in g['order']:
            assert g['nodes'][n]['parents'] == sorted(g['nodes'][n]['parents'])
            assert all(p in g['nodes'] for p in g['nodes'][n]['parents'])   # every parent is a solution node
        json.dumps(g)


@pytest.mark.fast
def test_parents_reproduce_the_fixture_op():
    """op = sum over nodes of (#parents + 1 if a constant is used). Resolving scratch letters right
    is the only way to get this for all 114 rows. In reverse mode the unknown leaf counts 1 (it was
    a constant leaf before being hidden)."""
    for row in ROWS:
        g = gold_of(row)
        op = sum(len(g['nodes'][n]['parents']) for n in g['order'])
        for step in row['solution'].split('Define ')[1:]:
            clauses = step.split('.')[0].split(';')[1:]
            op += any(re.search(r'\d', c.split('=')[1]) for c in clauses if '=' in c)
        op += row['mode'] == REV
        assert op == row['op'], row['solution']


@pytest.mark.fast
def test_gold_solutions_verify_perfect():
    for row in ROWS:
        g = gold_of(row)
        for pred in (row['solution'], as_model_output(row['solution'], g['answer'])):
            v = verify(pred, g)
            assert v.perfect and v.outcome and v.process_acc == 1.0, (v, row['solution'])
            assert counts(v) == (len(g['nodes']), 0, 0, 0, 0, False)
            assert v.closing_ok is (True if row['mode'] == REV else None)
            assert all(reward(v, k) == 1.0 for k in REWARDS + ('process',))


@pytest.mark.fast
def test_scratch_letters_resolve_to_parameter_names():
    text = ('Define a in P as P; so P = 3. Define b in P as U; so U = 4. Define c in P as Y; so Y = 7. '
            'Define d in P as u; so u = 2. Define e in P as V; t = P = 3; so V = 2 + t = 2 + 3 = 5. '
            'Define f in P as J; T = U + Y = 4 + 7 = 11; p = T + u = 11 + 2 = 13; so J = 2 * p = 2 * 13 = 26. '
            'Answer: 26.')
    g = parse_solution(text)
    assert g['mode'] == 'normalforward' and g['answer'] == 26
    assert g['nodes']['e in P'] == {'parents': ['a in P'], 'value': 5}
    assert g['nodes']['f in P'] == {'parents': ['b in P', 'c in P', 'd in P'], 'value': 26}
    assert g['nodes']['a in P'] == {'parents': [], 'value': 3}     # constants are not parents


@pytest.mark.fast
def test_letters_come_from_definitions_not_from_single_characters():
    # names with single-letter words, a forward variable called x, reused scratch letters
    text = ('Define a x in B Town as x; so x = 3. Define b in A Place as A; so A = x = 3. '
            'Define c in x as B; t = x = 3; so B = 2 * t = 2 * 3 = 6. '
            'Define d in t as D; t = A + B = 3 + 6 = 9; so D = t + x = 9 + 3 = 12. Answer: 12.')
    g = parse_solution(text)
    assert g['order'] == ['a x in B Town', 'b in A Place', 'c in x', 'd in t']
    assert g['nodes']['c in x'] == {'parents': ['a x in B Town'], 'value': 6}
    # "t" is reused: first a scratch letter for (x), then for (A + B)
    assert g['nodes']['d in t'] == {'parents': ['a x in B Town', 'b in A Place', 'c in x'], 'value': 12}
    assert verify(text, g).perfect


@pytest.mark.fast
def test_linear_forms():
    cases = {'2*x': (2, 0), 'x + 4': (1, 4), '2*x + 4': (2, 4), '(2*x) - (x)': (1, 0), '(2) * (x)': (2, 0),
             '-x + 3': (-1, 3), '(3) * (x + 1)': (3, 3), '(4) * (x + 8)': (4, 32), 'x + 1 + x': (2, 1),
             '2 + x + 90': (1, 92), '(5*x + 40) - (x)': (4, 40), '(6) - (3)': (0, 3), 'x - 3': (1, -3),
             '-2*x - 1': (-2, -1), '- - x': (1, 0), '((x))': (1, 0), '7': (0, 7), '2 * -x': (-2, 0),
             '4 - x': (-1, 4), '4 - 2*x': (-2, 4), '-x - 3': (-1, -3)}     # data.lin prints like sympy
    for s, ab in cases.items():
        assert _linear_form(s, 'x') == ab, s
    for s in ('x*x', '(x) * (x + 1)', '2 +', '()', '(2', '2)', 'y', '3 / 1', '2 x', '', '1' * 400, 'x ** 2',
              '__import__("os")', '٣'):
        assert _linear_form(s, 'x') is None, s
    assert _linear_form('x + 1', None) is None          # forward mode: no unknown in values


# --- letter renaming ---------------------------------------------------------------------------

LETTER = re.compile(r"(?<![\w'’])[A-Za-z](?![\w'’])")


def rename_letters(text, mode, rng):
    """Consistently rename every variable letter (a random permutation); x stays x in reverse mode."""
    pool = [chr(c) for c in range(65, 91)] + [chr(c) for c in range(97, 123)]
    if mode == REV:
        pool = [c for c in pool if c not in 'xX']
    perm = pool[:]
    rng.shuffle(perm)
    m = dict(zip(pool, perm))
    return LETTER.sub(lambda mo: m.get(mo.group(0), mo.group(0)), text)


def corruptions(row, g, rng):
    """A few wrong predictions of a row: a value, a parent, a dropped step, a wrong answer."""
    sol = as_model_output(row['solution'], g['answer'])
    out = [sol.replace('<answer> %d </answer>' % g['answer'], '<answer> %d </answer>' % (g['answer'] + 1))]
    steps = [span for span, name in zip(step_spans(sol), g['order']) if name != g['unknown']]
    span = rng.choice(steps)
    out.append(sol[:span[0]] + sol[span[1]:])
    out.append(bump_value(sol, span))
    return out


@pytest.mark.fast
def test_verdict_is_invariant_to_letter_renaming():
    rng = random.Random(0)
    renamed_differs = 0
    for row in ROWS:
        g = gold_of(row)
        preds = [row['solution'], as_model_output(row['solution'], g['answer'])] + corruptions(row, g, rng)
        for pred in preds:
            want = verify(pred, g)
            for _ in range(3):
                other = rename_letters(pred, row['mode'], rng)
                renamed_differs += other != pred
                assert verify(other, g) == want, (pred, other)
        # the renamed gold text parses to the same graph
        assert parse_solution(rename_letters(row['solution'], row['mode'], rng)) == g
    assert renamed_differs > 300


# --- single corruptions, classified exactly ----------------------------------------------------

def step_spans(text):
    """(start, end) of each "Define ..." step: up to the next step, "We know" or the answer."""
    starts = [m.start() for m in re.finditer('Define ', text)]
    ends = starts[1:] + [min(k for k in (text.find('We know'), text.find('Answer:'), text.find('</solution>'))
                             if k >= 0)]
    return list(zip(starts, ends))


def so_clause(text, span):
    """(start, end) of the defining clause "so L = ... = V" inside a step (the text before its '.')."""
    s0, s1 = span
    step = text[s0:s1]
    k = step.index('so ')
    return s0 + k, s0 + step.index('.', k)


def bump_value(text, span):
    c0, c1 = so_clause(text, span)
    return text[:c1] + ' + 1' + text[c1:]


def node_letters(text):
    return [m.group(2) for m in re.finditer(r'Define (.*?) as ([A-Za-z]);', text)]


def lenient_counts(v):
    return (v.correct + v.chain_errors, v.missing, v.extra, v.value_errors, v.parent_errors,
            not v.outcome or v.lenient_closing_ok is False)


@pytest.mark.fast
def test_one_wrong_value_is_one_value_error():
    """"... = 5 + 1": a value error of the node (and, strict, false arithmetic: 5 is not 6); its children
    still substitute the gold value for the letter, which now says 6: false arithmetic (or a false scratch
    clause) there too."""
    for row in ROWS:
        g = gold_of(row)
        sol = as_model_output(row['solution'], g['answer'])
        for i, span in enumerate(step_spans(sol)):
            name = g['order'][i]
            if name == g['unknown']:
                continue
            v = verify(bump_value(sol, span), g)
            n = len(g['nodes'])
            assert lenient_counts(v) == (n - 1, 0, 0, 1, 0, False), (v, name)
            assert v.outcome and not v.perfect and not v.lenient_perfect and v.closing_ok in (True, None)
            assert reward(v, 'process', 'lenient') == pytest.approx(1 - 1 / n)
            assert reward(v, 'blend_0.2_0.8', 'lenient') == pytest.approx(0.2 + 0.8 * (1 - 1 / n))
            assert v.errors[name][0] == 'value'
            children = {c for c in g['order'] if name in g['nodes'][c]['parents']}
            assert set(v.errors) - {name} <= children and v.chain_errors == len(v.errors) - 1
            assert all(v.errors[c] in (['arithmetic'], ['scratch'], ['arithmetic', 'scratch'])
                       for c in set(v.errors) - {name})
            assert reward(v, 'process') == pytest.approx(1 - len(v.errors) / n)
            assert reward(v, 'strict') == 0.0 and reward(v, 'outcome') == 1.0


@pytest.mark.fast
def test_stated_value_is_the_last_expression():
    text = 'Define a in P as A; so A = 3. Define b in P as B; so B = A + 2 = 3 + 2 = 5. Answer: 5.'
    g = parse_solution(text)
    assert verify(text.replace('= 5.', '= 6.'), g).value_errors == 1
    assert verify(text.replace('= 5.', '= 5 = 6.'), g).value_errors == 1
    assert verify(text.replace(' = 3 + 2 = 5.', '.'), g).value_errors == 1     # "so B = A + 2": no value
    assert verify(text.replace(' = 5.', '.'), g).perfect                          # "= 3 + 2" reads as 5


@pytest.mark.fast
def test_one_wrong_parent_is_one_parent_error():
    rng = random.Random(1)
    checked = 0
    for row in ROWS:
        g = gold_of(row)
        sol = as_model_output(row['solution'], g['answer'])
        letters = node_letters(sol)
        for i, span in enumerate(step_spans(sol)):
            if g['order'][i] == g['unknown']:
                continue
            c0, c1 = so_clause(sol, span)
            clause = sol[c0:c1]
            first = clause.split('=')[1]
            refs = [t for t in re.findall(r'[A-Za-z]', first) if t in letters[:i]]
            if not refs:
                continue           # constant, or computed through a scratch letter only
            old = rng.choice(refs)
            names = dict(zip(letters, g['order']))
            candidates = [L for L in letters[:i] if names[L] not in g['nodes'][g['order'][i]]['parents']]
            if not candidates:
                continue
            new = rng.choice(candidates)
            seg = re.sub(r'(?<![A-Za-z])%s(?![A-Za-z])' % old, new, first, count=1)
            bad = sol[:c0] + clause.replace(first, seg, 1) + sol[c1:]
            v = verify(bad, g)
            assert counts(v) == (len(g['nodes']) - 1, 0, 0, 0, 1, False), (v, clause, seg)
            assert v.outcome and not v.perfect
            checked += 1
    assert checked > 100


@pytest.mark.fast
def test_dropped_step_is_missing_plus_its_children():
    for row in ROWS:
        g = gold_of(row)
        sol = as_model_output(row['solution'], g['answer'])
        for i, (s0, s1) in enumerate(step_spans(sol)):
            name = g['order'][i]
            if name == g['unknown']:
                continue
            v = verify(sol[:s0] + sol[s1:], g)
            children = sum(name in g['nodes'][n]['parents'] for n in g['order'])
            known_dropped = row['mode'] == REV and name == g['known']['name']
            # children now refer to an undefined letter: a parent error each
            assert counts(v) == (len(g['nodes']) - 1 - children, 1, 0, 0, children, known_dropped), (v, name)
            assert not v.perfect and v.outcome


@pytest.mark.fast
def test_dropped_unknown_breaks_every_value_in_x():
    row = next(r for r in ROWS if r['mode'] == REV and r['op'] == 8)
    g = gold_of(row)
    sol = row['solution']
    s0 = sol.index('Define ' + g['unknown'])
    s1 = sol.index('Define ', s0 + 1)
    v = verify(sol[:s0] + sol[s1:], g)
    assert v.missing == 1 and v.answer_error and v.closing_ok is False and not v.perfect
    in_x = sum(1 for n in g['order'] if n != g['unknown'] and g['nodes'][n]['value'][0] != 0)
    assert v.value_errors == in_x


@pytest.mark.fast
def test_wrong_answer():
    for row in ROWS:
        g = gold_of(row)
        n = len(g['nodes'])
        bad = as_model_output(row['solution'], g['answer'] + 1)
        v = verify(bad, g)
        assert counts(v) == (n, 0, 0, 0, 0, True) and not v.outcome and not v.perfect
        assert v.answer == g['answer'] + 1
        assert reward(v, 'process') == pytest.approx(1 - 1 / n)
        assert reward(v, 'blend_0.2_0.8') == reward(v, 'blend_0.5_0.5') == reward(v, 'strict') == 0.0
        # without tags, "Answer: N." is the answer
        plain = row['solution'].rsplit('Answer:', 1)[0] + 'Answer: %d.' % (g['answer'] + 1)
        assert not verify(plain, g).outcome


@pytest.mark.fast
def test_closing_equation_errors_are_answer_errors():
    rev = [r for r in ROWS if r['mode'] == REV]
    for row in rev:
        g = gold_of(row)
        sol = as_model_output(row['solution'], g['answer'])
        n, ans, kv = len(g['nodes']), g['answer'], g['known']['value']
        letter = re.search(r'We know (\w+) =', sol).group(1)
        bad = [sol.replace('Solution: x = %d.' % ans, 'Solution: x = %d.' % (ans + 1)),
               sol.replace('We know %s = %d' % (letter, kv), 'We know %s = %d' % (letter, kv + 1)),
               sol.replace('Isolate the term with x: ', 'Isolate the term with x: 2 + '),
               sol.replace('Divide both sides by ', 'Divide both sides by 1'),      # "by 12: x = n / 2"
               sol.replace('so we have ', 'so we have 1 + '),
               sol[:sol.index('We know')] + '</solution> <answer> %d </answer>' % ans,  # no closing at all
               re.sub(r'Move all terms to one side: [^.]*\. ', '', sol)]           # a step left out
        for b in bad:
            assert b != sol
            v = verify(b, g)
            assert v.outcome and v.closing_ok is False and v.answer_error and not v.perfect, b
            assert counts(v) == (n, 0, 0, 0, 0, True)
            assert reward(v, 'process') == pytest.approx(1 - 1 / n)
            assert reward(v, 'outcome') == 1.0 and reward(v, 'strict') == 0.0
        # an equivalent rewriting of a step is fine ("2*x = 6" and "4*x = 12" have the same root)
        ok = re.sub(r'Move all terms to one side: ([^.]*) = 0\.', r'Move all terms to one side: 0 = (-1) * (\1).', sol)
        assert verify(ok, g).perfect


@pytest.mark.fast
def test_extra_and_redefined_nodes():
    row = next(r for r in ROWS if r['mode'] == 'normalforward' and r['op'] == 6)
    g = gold_of(row)
    sol = row['solution']
    n = len(g['nodes'])
    extra = sol.replace('Answer:', 'Define adult owl in Nowhere as Q; so Q = 3. Answer:')
    v = verify(extra, g)
    assert v.perfect and counts(v) == (n, 0, 1, 0, 0, False)
    assert reward(v, 'process') == pytest.approx(1 - 1 / n) and reward(v, 'strict') == 1.0
    first = sol[sol.index('Define '):sol.index('Define ', 1)]
    v = verify(sol.replace('Answer:', first + 'Answer:'), g)       # the same node defined twice
    assert v.extra == 1 and v.correct == n
    v = verify(sol.replace('Answer:', ' '.join(['Define junk %d as Q; so Q = 1.' % i for i in range(3 * n)])
                           + ' Answer:'), g)
    assert v.extra == 3 * n and reward(v, 'process') == 0.0     # extras are capped at |V| in the sum


@pytest.mark.fast
def test_rewards():
    v = Verdict(outcome=True, answer=5, perfect=False, process_acc=0.5, n_gold=4, correct=2, missing=1,
                extra=9, value_errors=1, parent_errors=0, answer_error=False)
    assert reward(v, 'outcome') == 1.0 and reward(v, 'strict') == 0.0
    assert reward(v, 'process') == 0.0                                     # 1 - (1 + 0 + 1 + 4 + 0)/4 < 0
    v.extra = 0
    assert reward(v, 'process') == pytest.approx(0.5)
    assert reward(v, 'blend_0.2_0.8') == pytest.approx(0.2 + 0.4)
    assert reward(v, 'blend_0.5_0.5') == pytest.approx(0.75)
    v.outcome, v.answer_error = False, True
    assert reward(v, 'process') == pytest.approx(0.25) and reward(v, 'blend_0.5_0.5') == 0.0
    assert set(REWARDS) == {'outcome', 'blend_0.2_0.8', 'blend_0.5_0.5', 'strict'}
    with pytest.raises(ValueError, match='unknown kind'):
        reward(v, 'bogus')
    assert v.to_dict()['n_gold'] == 4 and json.dumps(v.to_dict())


@pytest.mark.fast
def test_gold_may_be_a_row_and_bad_gold_is_a_clear_error():
    row = ROWS[5]
    g = gold_of(row)
    assert verify(row['solution'], row).perfect and verify(row['solution'], {'graph': g}).perfect
    for bad in ({}, {'nodes': {'a': {'parents': []}}}, {'nodes': {'a': {'parents': [], 'value': 'x'}}}, None, 3):
        with pytest.raises(ValueError, match='gold must be a graph'):
            verify(row['solution'], bad)


@pytest.mark.fast
def test_answer_extraction():
    g = gold_of(ROWS[0])
    sol = ROWS[0]['solution']
    body = sol.rsplit('Answer:', 1)[0]
    assert verify(body + '</solution> <answer>2</answer>', g).outcome
    assert not verify(body + '</solution> <answer> 2', g).outcome                  # truncated tag
    assert not verify(body + '</solution> <answer> 2.0 </answer>', g).outcome
    assert not verify(body + '</solution> <answer> two </answer> Answer: 2.', g).outcome   # tags win
    assert verify('<answer> 2 </answer>', g).outcome and verify('<answer> 2 </answer>', g).missing == 2
    assert reward(verify('<answer> 2 </answer>', g), 'blend_0.2_0.8') == pytest.approx(0.2)
    # a reverse text cut before "Answer:": the graph takes "Solution: x = N", the outcome does not
    row = next(r for r in ROWS if r['mode'] == REV)
    cut = row['solution'].rsplit(' Answer:', 1)[0]
    assert parse_solution(cut)['answer'] == gold_of(row)['answer']
    v = verify(cut, gold_of(row))
    assert v.answer is None and not v.outcome and v.closing_ok and v.correct == v.n_gold


# --- robustness --------------------------------------------------------------------------------

def _check(pred, gold):
    v = verify(pred, gold, safe=False)  # no last-resort try/except, so any internal error shows
    assert isinstance(v, Verdict) and 0.0 <= v.process_acc <= 1.0
    assert all(0.0 <= reward(v, k) <= 1.0 for k in REWARDS + ('process',))
    return v


def test_fuzz_mutations_and_garbage():
    rng = random.Random(2)
    alphabet = list('()+-*=;.:, x0123456789') + ['Define ', ' as ', 'so ', 'We know ', '<answer>', '</answer>',
                                                 '</solution>', "we don't know its value yet", 'Answer: ', 'é', '\x00']
    golds = [gold_of(row) for row in ROWS]
    t0 = time.process_time()
    for i in range(3000):
        row, g = ROWS[i % len(ROWS)], golds[i % len(ROWS)]
        s = list(as_model_output(row['solution'], g['answer']) if i % 2 else row['solution'])
        for _ in range(rng.randint(1, 8)):
            k = rng.randrange(len(s) + 1)
            op = rng.random()
            if op < 0.4:
                s.insert(k, rng.choice(alphabet))
            elif op < 0.7:
                del s[k:k + rng.randint(1, 20)]
            else:
                j = rng.randrange(len(s) + 1)
                s[k:k] = s[j:j + rng.randint(1, 40)]
        _check(''.join(s), g)
        if i % 10 == 0:
            _check(bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))).decode('utf-8', 'replace'), g)
            _check(bytes(rng.randrange(256) for _ in range(50)), g)
    assert time.process_time() - t0 < 20


ADVERSARIAL = [
    '(' * 200000 + 'x' + ')' * 200000,
    'Define a as A; so A = ' + '(' * 300000 + '1' + ')' * 300000 + '.',
    'Define a as A; so A = ' + '9*' * 300000 + '9.',
    'Define a as A; so A = ' + '9' * 400 + '. Answer: ' + '9' * 400 + '.',
    'Define a as A; so A = ' + '9' * 1000000 + '.',
    '<answer> ' + '9' * 1000000 + ' </answer>',
    'Define ' * 150000,
    'Define a as A;' * 70000,
    'Define a as x; ' + "we don't know its value yet; " * 30000,
    # each scratch letter doubles the parents of the next: must stay bounded
    'Define a as A; so A = 1. Define b as B; ' + ''.join('%s = %s + %s; ' % (c, p, p) for p, c in
                                                         zip('ACDEFGHIJKLMNOPQRSTUVWZ' * 2000,
                                                             'CDEFGHIJKLMNOPQRSTUVWZA' * 2000)) + 'so B = A.',
    'We know ' + 'x = 1, so we have ' * 50000,
    'We know A = 1, so we have x = 1 and we solve it through the following steps: ' + 'Divide: x = 1 / 0. ' * 50000,
    ' as ' * 250000 + ';',
    '= ' * 500000,
    'Answer:' + ' ' * 1000000,
    '\u202e\u0663\U0001F600 Define ü as ß; so ß = ٣. ' * 20000,
    'x' * 1000000,
]


@pytest.mark.fast
def test_adversarial_inputs_are_bounded():
    rev = gold_of(next(r for r in ROWS if r['mode'] == REV and r['op'] == 20))
    fwd = gold_of(next(r for r in ROWS if r['mode'] != REV and r['op'] == 20))
    for text in ADVERSARIAL:
        for g in (rev, fwd):
            t0 = time.process_time()
            v = _check(text, g)
            assert time.process_time() - t0 < 2.0, text[:60]
            assert not v.perfect
    assert parse_solution(None)['nodes'] == {} and parse_solution(b'\xff\xfe')['nodes'] == {}
    v = verify('Define a as A; so A = %s. Answer: %s.' % ('7' * 400, '7' * 400), fwd)
    assert v.answer is None and not v.outcome


@pytest.mark.fast
def test_never_evals():
    g = gold_of(ROWS[0])
    marker = os.path.join(ROOT, '_verify_eval_marker')
    payload = "__import__('pathlib').Path(%r).touch()" % marker
    sol = ROWS[0]['solution'].replace('so J = 2', 'so J = ' + payload)
    _check(sol, g)
    _check('<answer> %s </answer>' % payload, g)
    assert not os.path.exists(marker)


# --- rows, CLI, benchmark ----------------------------------------------------------------------

@pytest.mark.fast
def test_verify_rows_and_cli(tmp_path, capsys):
    rows = []
    for i, r in enumerate(ROWS[:20]):
        row = dict(r, id='r%d' % i)
        g = gold_of(r)
        row['prediction'] = as_model_output(r['solution'], g['answer'] + (i % 4 == 0))
        if i % 2:
            row['graph'] = g                    # otherwise the gold graph comes from the gold solution
        rows.append(row)
    verdicts, summary = verify_rows(rows)
    assert [v.outcome for v in verdicts] == [i % 4 != 0 for i in range(20)]
    assert summary['n'] == 20 and summary['outcome'] == pytest.approx(0.75)
    assert summary['perfect'] == pytest.approx(0.75) and summary['process_acc'] == 1.0
    assert set(summary['by_mode']) == {'normalforward', REV}

    inp, out = tmp_path / 'pred.jsonl', tmp_path / 'verdicts.jsonl'
    inp.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert verify_main(['--in=%s' % inp, '--out=%s' % out]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 20 and lines[1]['id'] == 'r1' and lines[1]['perfect'] and not lines[0]['outcome']
    assert lines[1]['rewards'] == {k: 1.0 for k in REWARDS} and lines[0]['rewards']['outcome'] == 0.0
    assert 'outcome 0.7500' in capsys.readouterr().out

    assert verify_main(['verify', '--in=%s' % (tmp_path / 'nope.jsonl')]) == 2
    assert 'cannot read' in capsys.readouterr().err
    del rows[3]['prediction']
    inp.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert verify_main(['--in=%s' % inp]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'row 4 (id r3)' in err and '"prediction"' in err
    inp.write_text('{"prediction": "x"}\n')
    assert verify_main(['--in=%s' % inp]) == 2 and 'neither "graph" nor "solution"' in capsys.readouterr().err
    inp.write_text('{not json\n')
    assert verify_main(['--in=%s' % inp]) == 2 and 'line 1 is not valid JSON' in capsys.readouterr().err
    assert verify_main([]) == 2 and '--in' in capsys.readouterr().err
    assert verify_main(['--bogus']) == 2 and 'unknown config key' in capsys.readouterr().err


@pytest.mark.fast
def test_bench_verify_runs():
    assert bench_verify(ROWS[:10], seconds=0.05) > 0


@pytest.mark.slow
def test_verify_speed():
    rate = bench_verify(ROWS, seconds=3)
    print('verifications/s (CPU time, fixture op 2..20 mix): %.0f' % rate)
    assert rate > 5000


# --- the generator's gold graphs ---------------------------------------------------------------

def test_generator_gold_graphs_match_the_parser():
    import data
    problems = data.generate_problems(300, list(range(2, 21)), seed=0)
    rng = random.Random(3)
    modes = set()
    for p in problems:
        modes.add(p.mode)
        g = p.graph
        parsed = parse_solution(p.solution)
        for key in ('mode', 'order', 'nodes', 'answer', 'unknown', 'known'):
            assert parsed[key] == g[key], (key, p.solution, parsed[key], g[key])
        for pred in (p.solution, as_model_output(p.solution, p.answer), rename_letters(p.solution, p.mode, rng)):
            v = verify(pred, g)
            assert v.perfect, (v, pred)
    assert modes == {'normalforward', REV}


# --- the strict check: every number a step writes (STUDY.md §2) ----------------------------------

def clause_spans(sol):
    """(start, end, is_node_clause) of every clause of every Define step ("l = C = 2", "so E = 3 + l = ...")."""
    out = []
    for m in re.finditer(r'Define [^;.]*? as (\w+); ', sol):
        end = sol.index('.', m.end())
        pos = m.end()
        for clause in sol[m.end():end].split('; '):
            if "know its value" not in clause:
                out.append((pos, pos + len(clause), clause.startswith('so ')))
            pos += len(clause) + 2
    return out


def _edit(sol, rng, pick, change):
    """Apply change(clause text) -> new text to a random clause that pick(clause, is_node) accepts; None if none."""
    spans = [(s, e) for s, e, node in clause_spans(sol) if pick(sol[s:e], node)]
    if not spans:
        return None
    s, e = rng.choice(spans)
    new = change(sol[s:e])
    return None if new is None else sol[:s] + new + sol[e:]


def _bump_last_number(part):
    nums = list(re.finditer(r'\d+', part))
    k = nums[-1]
    return part[:k.start()] + str(int(k.group()) + 7) + part[k.end():]


def wrong_operand(sol, rng):
    """'so E = 3 + l = 3 + 9 = 5': a number of the substituted expression of a node's clause changed."""
    def change(c):
        parts = c.split('=')
        parts[2] = _bump_last_number(parts[2])
        return '='.join(parts)
    return _edit(sol, rng, lambda c, node: node and c.count('=') >= 3 and re.search(r'\d', c.split('=')[2]), change)


def wrong_intermediate(sol, rng):
    """'so E = 3 + l = 3 + 2 = (5) + 1 = 5': a false expression before the final value."""
    def change(c):
        head, last = c.rsplit(' = ', 1)
        return f'{head} = ({last}) + 1 = {last}'
    return _edit(sol, rng, lambda c, node: node and c.count('=') >= 3, change)


def wrong_scratch_value(sol, rng):
    """'l = C = 2 + 7' while the later steps keep using 2."""
    return _edit(sol, rng, lambda c, node: not node, lambda c: c + ' + 7')


def scratch_used_before_assigned(sol, rng):
    """'Define E as E; so E = 3 + l = 3 + 2 = 5; l = C = 2.': the scratch clause after its use."""
    steps = [m for m in re.finditer(r'(Define [^;.]*? as \w+; )([^.]*)\.', sol)
             if '; ' in m.group(2) and not m.group(2).startswith('so ')]
    if not steps:
        return None
    m = rng.choice(steps)
    clauses = m.group(2).split('; ')
    body = '; '.join(clauses[1:] + clauses[:1])
    return sol[:m.start(2)] + body + sol[m.end(2):]


def computes_something_else(sol, rng):
    """'so E = 3 - l = 3 + 2 = 5': the right letters, another operation (every value here is non-zero)."""
    def change(c):
        parts = c.split('=')
        sym = parts[1]
        k = next((i for i, ch in enumerate(sym) if ch in '+-' and sym[i - 1] == ' '), None)
        if k is None:
            return None
        parts[1] = sym[:k] + ('-' if sym[k] == '+' else '+') + sym[k + 1:]
        return '='.join(parts)
    return _edit(sol, rng, lambda c, node: node and c.count('=') >= 3 and re.search(r' [+-] ', c.split('=')[1]),
                 change)


def wrong_closing_step(sol, rng):
    """'Move all terms to one side: 4*x - 8 = 0' for '2*x - 4 = 0', or 'Isolate ...: 4*x = 8': the same root,
    the step does not say what it should."""
    step = rng.choice(['Move all terms to one side', 'Isolate the term with x'])
    m = re.search(re.escape(step) + r': ([^.=]*) = ([^.=]*)\.', sol)
    if m is None:
        return None
    lhs, rhs = m.group(1), m.group(2)
    return sol[:m.start(1)] + f'(2) * ({lhs}) = (2) * ({rhs})' + sol[m.end(2):]


MUTATIONS = {  # name -> (edit, the error kind it must show, does the lenient check miss it)
    'wrong_operand': (wrong_operand, 'arithmetic', True),
    'wrong_intermediate': (wrong_intermediate, 'arithmetic', True),
    'wrong_scratch_value': (wrong_scratch_value, 'scratch', True),
    'scratch_used_before_assigned': (scratch_used_before_assigned, 'unassigned', False),
    'computes_something_else': (computes_something_else, 'arithmetic', True),
    'wrong_closing_step': (wrong_closing_step, 'closing', True),
}


def generated_problems(n, seed=0):
    import data
    return data.generate_problems(n, data.mixture(list(range(2, 21))), seed=seed)


@pytest.mark.fast
def test_issue_examples():
    """The two edits the issue found accepted, on the forward solution it quotes."""
    sol = ('Define adult owl in Cedar Valley as W; so W = 2. Define adult blue jay in Pine Ridge as C; so C = W = 2. '
           'Define adult parrot in Pine Ridge as E; l = C = 2; so E = 3 + l = 3 + 2 = 5. '
           'Define adult owl in Pine Ridge as q; so q = E = 5. Answer: 5.')
    g = parse_solution(sol)
    assert verify(sol, g).perfect
    for bad, kinds in ((sol.replace('3 + l = 3 + 2', '3 + l = 3 + 9'), ['arithmetic']),
                       (sol.replace('l = C = 2', 'l = C = 7'), ['arithmetic', 'scratch']),
                       (sol.replace('3 + l = 3 + 2', '3 * l = 3 + 2'), ['arithmetic']),
                       (sol.replace('so E = 3 + l = 3 + 2 = 5', 'so E = 3 + l = 3 + 2 = 6 = 5'), ['arithmetic'])):
        v = verify(bad, g)
        assert not v.perfect and v.lenient_perfect and v.errors == {'adult parrot in Pine Ridge': kinds}, bad
        assert v.chain_errors == 1 and v.correct == 3 and v.lenient_process_acc == 1.0 and v.process_acc == 0.75
        assert reward(v, 'strict') == 0.0 and reward(v, 'strict', 'lenient') == 1.0
        assert reward(v, 'process') == pytest.approx(0.75) and reward(v, 'process', 'lenient') == 1.0
        assert v.error_counts()[kinds[-1]] == 1 and v.error_counts()['closing'] == 0
    # true rewritings stay right: no substitution written, a value left unsimplified, the same equation
    for ok in (sol.replace('3 + l = 3 + 2 = 5', '3 + l = 5'), sol.replace('3 + l = 3 + 2 = 5', '3 + l = 3 + 2'),
               sol.replace('3 + l = 3 + 2', '3 + l = (3) + (2)')):
        assert verify(ok, g).perfect, ok
    # a substitution must give each letter its value, even when the sums agree
    two = ('Define a in P as A; so A = 2. Define b in P as B; so B = 3. Define c in P as C; '
           'so C = A + B = 2 + 3 = 5. Answer: 5.')
    g2 = parse_solution(two)
    for bad in (two.replace('2 + 3 = 5', '1 + 4 = 5'), two.replace('2 + 3 = 5', '3 + 2 = 5')):
        v = verify(bad, g2)
        assert v.lenient_perfect and not v.perfect and v.errors == {'c in P': ['arithmetic']}
    with pytest.raises(ValueError, match='unknown check'):
        reward(verify(sol, g), 'strict', 'bogus')


@pytest.mark.fast
def test_reverse_substitutions_and_closing():
    row = next(r for r in ROWS if r['mode'] == REV and r['op'] >= 8 and '+ x + ' in r['solution'])
    g = gold_of(row)
    sol = row['solution']
    v = verify(sol, g)
    assert v.perfect and v.lenient_perfect and v.closing_ok and v.lenient_closing_ok
    # an operand of an unparenthesised substituted form ("... + x + 3") changed
    m = re.search(r'= ([^=;.]*\+ x \+ )(\d+) =', sol)
    bad = sol[:m.start(2)] + str(int(m.group(2)) + 1) + sol[m.end(2):]
    v = verify(bad, g)
    assert v.lenient_perfect and not v.perfect and list(v.errors.values()) in ([['arithmetic']], [['scratch']])
    # every closing step is checked against the one before it
    for old, new in ((r'Move all terms to one side: ([^.]*) = 0\.', r'Move all terms to one side: (3) * (\1) = 0.'),
                     (r'Isolate the term with x: (\d+)\*x = (-?\d+)\.', r'Isolate the term with x: (2) * (\1*x) = 2 * \2.'),
                     (r'Solution: x = (\d+)\.', r'Solution: x = (\1).'), ):
        other = re.sub(old, new, sol)
        assert other != sol
        v = verify(other, g)
        if new.endswith('(\\1).'):
            assert v.perfect                                    # "x = (2)" is still x = 2
            continue
        assert v.lenient_perfect and v.lenient_closing_ok and not v.closing_ok and not v.perfect, other
        assert v.answer_error and v.errors == {} and v.error_counts()['closing'] == 1
        n = len(g['nodes'])
        assert reward(v, 'process') == pytest.approx(1 - 1 / n) and reward(v, 'process', 'lenient') == 1.0


def test_mutations_of_generated_gold_are_caught():
    """Each hand-made edit of a gold solution (op 2-20, both modes, every template) is not perfect, with
    the error kind it should have; where the lenient check cannot see it, lenient still calls it perfect."""
    import data
    rng = random.Random(5)
    seen = {name: 0 for name in MUTATIONS}
    problems = generated_problems(300, seed=7)
    assert {p.template for p in problems} == set(data.TEMPLATES) and {p.mode for p in problems} == set(data.MODES)
    for p in problems:
        for name, (edit, kind, lenient_blind) in MUTATIONS.items():
            bad = edit(p.solution, rng)
            if bad is None:
                continue
            assert bad != p.solution, name
            v = _check(bad, p.graph)
            assert not v.perfect, (name, bad)
            assert v.error_counts()[kind] >= 1, (name, v.errors, bad)
            if lenient_blind:
                assert v.lenient_perfect, (name, bad)
            v2 = verify(rename_letters(bad, p.mode, rng), p.graph)
            assert v2 == v, (name, bad)
            seen[name] += 1
    assert min(seen.values()) >= 50, seen


def test_gold_and_renamed_gold_stay_perfect_strict_and_lenient():
    import data
    rng = random.Random(9)
    problems = generated_problems(400, seed=11)
    assert {p.template for p in problems} == set(data.TEMPLATES) and {p.mode for p in problems} == set(data.MODES)
    for p in problems:
        for pred in (p.solution, as_model_output(p.solution, p.answer), rename_letters(p.solution, p.mode, rng)):
            v = verify(pred, p.graph)
            assert v.perfect and v.lenient_perfect and v.errors == {} and v.chain_errors == 0, (v, pred)


@pytest.mark.fast
def test_released_rows_keep_their_depth(tmp_path):
    """The release's dataset rows carry a 'depth' field: read_jsonl keeps it (as an int); rows without it
    get none."""
    import data
    released = {k: ROWS[3][k] for k in ('problem', 'question', 'solution')}
    path = tmp_path / ('op%d_1k.jsonl' % ROWS[3]['op'])
    path.write_text(json.dumps(dict(released, depth='4')) + '\n' + json.dumps(released) + '\n')
    with_depth, without = data.read_jsonl(str(path))
    assert with_depth['depth'] == 4 and 'depth' not in without
    assert with_depth['op'] == ROWS[3]['op'] and verify(with_depth['solution'], with_depth['graph']).perfect
