"""Regular expressions from adapter configs, matched without backtracking.

An ``adapter_config.json`` holds regular expressions (``target_modules`` as a
string, the keys of ``rank_pattern`` and ``alpha_pattern``) that PEFT runs
with :mod:`re`, a backtracking engine: ``(a+)+$`` against ``aaaa...a.x`` takes
exponential time, and a forged file could hang the reader. Here a pattern is
parsed by Python's own parser (so it means what it means to :mod:`re` and to
PEFT) and run as a Thompson automaton (a Pike VM): every step advances all
the ways a match can go at once, so a match costs at most (pattern size) x
(text length) steps, plus the same for each lookaround. Back-references,
conditional groups, atomic groups, possessive repeats and inline flags (which
no automaton, or no module path, needs) are refused with :class:`re.error`.
A pattern that is a plain (escaped) name is compared as a string.
"""

from __future__ import annotations

import re

try:  # Python 3.11+
    from re import _constants as sre
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as sre
    import sre_parse

__all__ = ["Pattern", "literal"]

#: Largest automaton built for one pattern (counted repeats are unrolled).
MAX_PROGRAM = 20_000
_SPECIAL = frozenset(".^$*+?{}[]|()")


def literal(pattern):
    """The plain string a pattern stands for (``re.escape`` undone), or None if it uses regex syntax."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 == len(pattern) or pattern[i + 1].isalnum():  # \d, \w, \1, ...: not a plain character
                return None
            out.append(pattern[i + 1])
            i += 2
        elif c in _SPECIAL:
            return None
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _category(code):
    tests = {
        sre.CATEGORY_DIGIT: str.isdecimal,
        sre.CATEGORY_SPACE: str.isspace,
        sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
        sre.CATEGORY_LINEBREAK: lambda c: c == "\n",
    }
    negated = {
        sre.CATEGORY_NOT_DIGIT: sre.CATEGORY_DIGIT,
        sre.CATEGORY_NOT_SPACE: sre.CATEGORY_SPACE,
        sre.CATEGORY_NOT_WORD: sre.CATEGORY_WORD,
        sre.CATEGORY_NOT_LINEBREAK: sre.CATEGORY_LINEBREAK,
    }
    if code in tests:
        return tests[code]
    if code in negated:
        test = tests[negated[code]]
        return lambda c: not test(c)
    raise re.error(f"character category {code} is not supported here")


def _in(items):
    """The test of a character class ``[...]``."""
    negate = bool(items) and items[0][0] == sre.NEGATE
    tests = []
    for op, av in items[1:] if negate else items:
        if op == sre.LITERAL:
            tests.append(lambda c, v=av: ord(c) == v)
        elif op == sre.RANGE:
            tests.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
        elif op == sre.CATEGORY:
            tests.append(_category(av))
        else:
            raise re.error(f"{op} in a character class is not supported here")
    return lambda c: any(t(c) for t in tests) != negate


def _char_test(op, av):
    if op == sre.LITERAL:
        return lambda c: ord(c) == av
    if op == sre.NOT_LITERAL:
        return lambda c: ord(c) != av
    if op == sre.ANY:
        return lambda c: c != "\n"
    return _in(av)


def _emit(items, prog):
    """Append the automaton of parsed ``items`` to ``prog`` (a list of instructions)."""
    for op, av in items:
        if len(prog) > MAX_PROGRAM:
            raise re.error(f"the pattern is too large (over {MAX_PROGRAM} steps once its repeats are unrolled)")
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            prog.append(("char", _char_test(op, av)))
        elif op == sre.SUBPATTERN:
            if av[1] or av[2]:
                raise re.error("inline flags are not supported here")
            _emit(av[3], prog)
        elif op == sre.BRANCH:
            _branch(av[1], prog)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # greedy or not: the same set of matches
            _repeat(*av, prog)
        elif op == sre.AT:
            prog.append(("at", av))
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            direction, sub = av
            width = sub.getwidth()[0] if direction < 0 else None  # lookbehind: fixed width (re requires it)
            prog.append(("look", _compile(sub), direction, op == sre.ASSERT_NOT, width))
        else:
            raise re.error(f"{op} is not supported here (back-references, atomic or conditional groups)")


def _branch(alternatives, prog):
    jumps = []
    for k, alt in enumerate(alternatives):
        if k < len(alternatives) - 1:
            split = len(prog)
            prog.append(None)
            _emit(alt, prog)
            jumps.append(len(prog))
            prog.append(None)
            prog[split] = ("split", split + 1, len(prog))
        else:
            _emit(alt, prog)
    for j in jumps:
        prog[j] = ("jmp", len(prog))


def _repeat(lo, hi, sub, prog):
    for _ in range(lo):
        _emit(sub, prog)
    if hi == sre.MAXREPEAT:
        loop = len(prog)
        prog.append(None)
        _emit(sub, prog)
        prog.append(("jmp", loop))
        prog[loop] = ("split", loop + 1, len(prog))
        return
    exits = []
    for _ in range(hi - lo):
        exits.append(len(prog))
        prog.append(None)
        _emit(sub, prog)
    for s in exits:
        prog[s] = ("split", s + 1, len(prog))


def _compile(parsed):
    prog = []
    _emit(parsed, prog)
    prog.append(("match",))
    return prog


def _word(text, i):
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")


def _at(code, text, i):
    if code in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
        return i == 0
    if code == sre.AT_END:
        return i == len(text) or (i == len(text) - 1 and text[i] == "\n")
    if code == sre.AT_END_STRING:
        return i == len(text)
    if code in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY):
        return (_word(text, i - 1) != _word(text, i)) == (code == sre.AT_BOUNDARY)
    raise re.error(f"anchor {code} is not supported here")


def _look(step, text, i):
    _, sub, direction, negate, width = step
    if direction < 0:
        found = i - width >= 0 and _run(sub, text, {i - width}, i)
    else:
        found = _run(sub, text, {i}, None)
    return found != negate


def _close(prog, pc, text, i, out, seen):
    """Add to ``out`` every character or match step reachable from ``pc`` at position ``i`` without reading."""
    stack = [pc]
    while stack:
        pc = stack.pop()
        if pc in seen:
            continue
        seen.add(pc)
        step = prog[pc]
        kind = step[0]
        if kind == "jmp":
            stack.append(step[1])
        elif kind == "split":
            stack += [step[2], step[1]]
        elif kind == "at":
            if _at(step[1], text, i):
                stack.append(pc + 1)
        elif kind == "look":
            if _look(step, text, i):
                stack.append(pc + 1)
        else:
            out.append(pc)


def _run(prog, text, starts, end):
    """Whether ``prog`` matches ``text`` from a position in ``starts`` to ``end`` (None: to any position)."""
    stop = len(text) if end is None else end
    current, seen = [], set()
    for i in range(min(starts), stop + 1):
        if i in starts:
            _close(prog, 0, text, i, current, seen)
        if end is None and any(prog[pc][0] == "match" for pc in current):
            return True
        if i == stop:
            break
        following, seen = [], set()
        for pc in current:
            step = prog[pc]
            if step[0] == "char" and step[1](text[i]):
                _close(prog, pc + 1, text, i + 1, following, seen)
        current = following
    return any(prog[pc][0] == "match" for pc in current)


class Pattern:
    """A regular expression compiled for matching without backtracking.

    Parameters
    ----------
    pattern : str

    Raises
    ------
    re.error
        Not a regular expression, or one using what an automaton cannot run.
    """

    def __init__(self, pattern):
        if not isinstance(pattern, str):
            raise re.error(f"a pattern must be a string, got {type(pattern).__name__}")
        self.pattern = pattern
        self.text = literal(pattern)
        if self.text is None:
            parsed = sre_parse.parse(pattern)
            if parsed.state.flags & ~sre.SRE_FLAG_UNICODE:
                raise re.error("inline flags are not supported here")
            self._prog = _compile(parsed)

    def fullmatch(self, text):
        """``re.fullmatch(pattern, text) is not None``."""
        if self.text is not None:
            return text == self.text
        return _run(self._prog, text, {0}, len(text))

    def suffix_match(self, text):
        """``re.match(rf"(.*\\.)?({pattern})$", text) is not None``: PEFT's ``rank_pattern`` rule.

        The pattern matches the whole text or a part of it that follows a
        dot (``text`` is a module path: no newline, so ``$`` is its end).
        """
        if self.text is not None:
            return text == self.text or text.endswith("." + self.text)
        starts = {0} | {i + 1 for i, c in enumerate(text) if c == "."}
        return _run(self._prog, text, starts, len(text))
