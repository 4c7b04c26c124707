"""
The solution parser, the graph verifier and the RL rewards (STUDY.md §2); imports no file of the project.

parse_solution(text) reads a solution (gold or generated, forward or reverse) into
a graph keyed by parameter NAME; verify(prediction, gold_graph) compares it with the
gold graph and returns a Verdict; reward(verdict, kind) turns that into an RL reward.

How a solution is read (linear time, no regex backtracking, never eval):
- Each "Define {name} as {L}; ..." step is one node. The step runs up to its first
  "."; its clauses are separated by ";". The clause whose left side is L (usually
  "so L = ...") defines the node (the last one wins; L always means the node inside
  its own step); the others ("t = ...") define scratch letters.
- A letter means its most recent definition (a Define or a scratch clause), looked
  up in a table; letters are never guessed from single characters, so a consistent
  renaming of the letters never changes a verdict. A scratch letter stands for the
  parameters it was computed from, so "T = U + Y; p = T + u; so J = 2 * p" gives J
  the parents [U, Y, u]. Constants are not parents. Undefined letters become the
  parent "?L", which matches no gold parent.
- Parents come from the first expression after "L =" (the symbolic one); the value
  is the LAST expression of the clause, read as a linear form a*x + b with + - *,
  parentheses and unary minus ("2*x + 4", "(2*x) - (x)", "(3) * (x + 1)", "-x + 3").
  It need not be simplified: "= 3 + 2" reads as 5. Only the reverse unknown (the
  letter of "Define ... as x; we don't know its value yet") may appear in a value.
  In forward mode a value is an int; in reverse mode every value is [a, b], the
  unknown being [1, 0] with no parents.
- A name defined twice keeps its first definition; each redefinition counts as an
  extra node.

Two verdicts come out of one reading (a Verdict carries both):
- lenient: each gold node has the right parents and the right final value, and (reverse)
  the closing below has the gold equation and root. This is what the original study's
  scorer judges; it never reads the numbers between the first and the last expression of
  a clause, nor whether a scratch letter's value is right.
- strict (perfect, correct, process_acc, the RL rewards): lenient, and every equality the
  step writes is true. Each clause "L = e0 = e1 = ... = ek" is read with every letter
  standing for the value its latest clause gave it (the last expression of that clause;
  a Define's letter has no value until its own clause), and then
    - each ei equals e(i+1) as a linear form (exact integers; a*x + b in reverse mode);
    - where e(i+1) rewrites ei operand by operand (same operators at the top level,
      e.g. "3 + l = 3 + 2", "x + D = x + x + 2", "3 * m = (3) * (x + 1)"), each operand
      is replaced by an expression of its value: "l + m = 1 + 4" with l = 2, m = 3 is false
      although the sums agree (_substitutes);
    - a letter with no value yet (used before its clause) makes the step wrong.
  A false equality in the node's own clause is an 'arithmetic' error of that node, one in
  a scratch clause a 'scratch' error of the node whose step holds it, a letter with no
  value an 'unassigned' error (ERROR_KINDS lists every kind; Verdict.errors gives each
  wrong gold node its kinds). chain_errors counts the gold nodes that only the strict
  check finds wrong (right parents and value, a false equality): "right values, false
  arithmetic".

Reverse mode also checks the closing ("We know L = v, so we have E = v and we solve
it through the following steps: Simplifying the equation: ... Move all terms to one
side: ... Isolate the term with x: ... Divide both sides by d: x = n / d. Solution:
x = N."). It is correct iff L names the gold known parameter and v is its value, E
equals that parameter's gold linear form, all five steps are present, each step's
equation is linear in x with a non-zero x coefficient and the gold answer as its root
(so each is equivalent to the gold equation), and the divisor d is the one on the
right-hand side (the lenient closing, as the original judges it). The strict closing
also asks each step to restate the one before it as the step says (_closing_chain_ok):
Simplifying and Move keep lhs - rhs, Isolate writes it as c*x = n, Divide as
x = n / c, Solution as x = N with N * c = n; "Isolate: 4*x = 8" after "Move: 2*x - 4 = 0"
has the right root but is false. A wrong or missing closing is an ANSWER error
(answer_error = True) even when the <answer> tag is right: it costs one error in the
process reward and makes the sample not perfect; the outcome reward still reads only the tag.
"""

from __future__ import annotations

import functools
import itertools
import re
import warnings
from dataclasses import asdict, dataclass, field


# the two solution modes (data.py's generator writes them; it takes these names from here)
MODES = ('normalforward', 'forwardreverse')
FORWARD, REVERSE = MODES

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
UNKNOWN_MARK = 'know its value yet'
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
    """Tokens split at their top-level binary operators -> (operands as (start, end) slices of toks, operators),
    or None when the parentheses do not balance. An operator right after another one (or first) is a unary sign.
    Slices, not copies: a run of operands with the operators between them is then one slice of toks."""
    bounds, ops, start, depth = [], [], 0, 0
    for i, t in enumerate(toks):
        if t == '(':
            depth += 1
        elif t == ')':
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0 and t in _BINARY and i > start and toks[i - 1] not in _BINARY:
            bounds.append((start, i))
            ops.append(t)
            start = i + 1
    if depth or start == len(toks):
        return None
    bounds.append((start, len(toks)))
    return bounds, ops


_SUBST_MAX_EXTRA = 3          # _substitutes reads operands of b with up to this many operators of their own


def _substitutes(ta, tb, var, vals):
    """Can b be cut into a's operands, each written as an expression of its value ("x + D" -> "x + x + 2" with
    D = x + 2; "3 * m" -> "(3) * (x + 1)")? The cuts are at top-level operators of b equal to a's, in order.
    True also when no cut gives a's shape at all ("l + m = 5"): then only the values, compared by the
    caller, count. ta, tb: the tokens of a and b; a's letters all have values."""
    sa, sb = _top_split(ta), _top_split(tb)
    if sa is None or sb is None:
        return True
    (a_bounds, a_ops), (b_bounds, b_ops) = sa, sb
    if not 0 <= len(b_ops) - len(a_ops) <= _SUBST_MAX_EXTRA or len(a_ops) > 6:
        return True             # b is no rewriting of a
    want = [_eval_tokens(ta[i:j], var, vals) for i, j in a_bounds]
    spans = {}

    def span(i, j):             # b's operands i..j with the operators between them
        if (i, j) not in spans:
            spans[i, j] = _eval_tokens(tb[b_bounds[i][0]:b_bounds[j][1]], var, vals)
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
            if UNKNOWN_MARK in clause:
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
