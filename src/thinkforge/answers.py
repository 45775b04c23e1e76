"""Answer extraction: the final answer of a completion, as a string (pure string work, bounded input).

`extract_answer` reads the text after the last `</think>` (the whole text when there is none) and
takes the LAST final statement it finds:

- "boxed": the last `\\boxed{}`/`\\fbox{}`; boxes written side by side at the end (`\\boxed{1},
  \\boxed{2}`, `$x=\\boxed{1}$ and $x=\\boxed{2}$`) are one answer, joined as `1, 2`;
- "answer_is": "the answer is ...", "Answer: ...", "Final Answer: ..." on one line; when that line
  is a sentence ("Final Answer: The largest $n$ is 34.") the answer is its last inline math
  expression or number, whichever comes last. A later "answer is" line beats an earlier box when it
  starts with the answer and holds math ("the final answer is 7"; not "this answer is consistent
  with the 3 cases"); a box after it beats it;
- mode "fallback" only: "choice" for choice items (a last "(C)" or a line holding only a letter); for
  math items "last_math" (the last inline `$...$` / `\\(...\\)` expression in the final 4,096
  characters, when no bare number follows it) or "last_number" (the last number in the text). A
  completion cut off inside a box (truncated) gets no fallback.

Nothing here parses math: `thinkforge.verify` judges the extracted string.
"""

from __future__ import annotations

import re

RULES = ("boxed", "answer_is", "choice", "last_math", "last_number")
STRICT_RULES = ("boxed", "answer_is")  # the rules mode "strict" tries; "fallback" tries them first too
ANSWER_TYPES = ("math", "choice")
MODES = ("strict", "fallback")

#: extraction reads at most this many characters from the end of the final segment of a completion
MAX_SCAN_CHARS = 65_536
#: an extracted answer longer than this is judged wrong without parsing it (gold: unverifiable)
MAX_ANSWER_CHARS = 2_048
#: how many `\boxed` occurrences (from the last) are tried when the last one is unbalanced
_MAX_BOX_TRIES = 4
#: rule "last_math" looks for the last inline expression in this many final characters
_MAX_MATH_SCAN = 4_096
#: at most this many boxes written side by side are joined into one answer
_MAX_JOINED_BOXES = 8

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_RE = re.compile(r"\\\\|\\[{}]|[{}]")
_BOX_BARE_RE = re.compile(r"[ \t]{1,64}([^\s${}\\]{1,64})")
# what may stand between boxes that are parts of one answer: ", " "; " " and " "$, $" "$ and $x = "
_BOX_SEP_RE = re.compile(
    r"[ \t]{0,8}\$?[ \t]{0,8}(?:[,;&]|\\quad|\\text\{[ \t]*(?:and|or|,)[ \t]*\}|\band\b|\bor\b)[ \t]{0,8}\$?[ \t]{0,8}"
    r"(?:[A-Za-z](?:_\{?\w{1,4}\}?)?[ \t]{0,4}=[ \t]{0,4})?"
)
# "answer" then "is", ":" or "=" (markdown bold allowed around); the content follows on the same line
_ANSWER_WORD_RE = re.compile(r"(?i)\banswer\b")
_ANSWER_TAIL_RE = re.compile(
    r"[ \t]{0,8}(?:\*\*|__)?[ \t]{0,8}(?:is\b[ \t]{0,8}(?:\*\*)?[ \t]{0,8}[:：]?|[:：=])"
    r"[ \t]{0,8}(?:\*\*|__)?[ \t]{0,8}([^\n]{1,400})"
)
_LAST_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_CHOICE_PAREN_RE = re.compile(r"(?<![A-Za-z\\])\(([A-D])\)")
_CHOICE_LINE_RE = re.compile(r"(?m)^[ \t]{0,8}(?:\*\*)?\(?([A-D])\)?(?:\*\*)?\.?[ \t]{0,8}$")
_CHOICE_TEXT_CMDS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{")
_CHOICE_LETTER_RE = re.compile(r"^\(?([A-D])\)?(?:$|[.:)\s,])")
_CHOICE_LOWER_RE = re.compile(r"\(?([a-d])\)?\.?")
_PROSE_RE = re.compile(r"(?<![\\{A-Za-z])[A-Za-z]{2,}[ \t]+[A-Za-z]{2,}\b")
_TEXT_GROUP_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox)\s*\{[^{}\n]{0,400}\}")
# inline math: $...$ (not \$, not "$5 and $10" money), \(...\), $$...$$, \[...\]
_INLINE_MATH_RE = re.compile(
    r"\$\$(?P<dd>[^$]{1,400}?)\$\$"
    r"|(?<![\\$])\$(?!\s)(?P<d>(?:\\\$|[^$\n]){1,400}?)(?<![\s\\])\$(?![\d$])"
    r"|\\\((?P<p>[^\n]{1,400}?)\\\)"
    r"|\\\[(?P<b>.{1,400}?)\\\]",
    re.S,
)
# a bare name is not an answer: "the value of $n$", "$x_1$"
_BARE_NAME_RE = re.compile(r"[A-Za-z](?:_\{?\w{1,4}\}?)?|\\(?:alpha|beta|gamma|theta|lambda|omega)")
# a later "answer is" line may override a box only when it holds math
_MATHY_RE = re.compile(r"[\d\\$^=]")
_WORD_AFTER_RE = re.compile(r"(?<![\\{A-Za-z])[ \t]+[A-Za-z]{3,}\b")


def final_segment(text: str) -> str:
    """The part of a completion that holds the final answer: after the last `</think>` if any."""
    i = text.rfind("</think>")
    return text[i + len("</think>"):] if i >= 0 else text


def _tail(text: str) -> str:
    """What the line-based rules ("answer is", choice, last number) read: the last MAX_SCAN_CHARS."""
    return text[-MAX_SCAN_CHARS:] if len(text) > MAX_SCAN_CHARS else text


def _balanced_from(text: str, open_pos: int, limit: int) -> tuple[str | None, bool, int]:
    """(content, closed, end) of the brace group opening at text[open_pos] == '{' (end: just past '}').

    Reads at most `limit` characters: a group still open after that returns its first `limit`
    characters with closed=False (an over-long answer); a group open at the end of the text
    returns (None, False, len) (a truncated completion).
    """
    depth = 0
    stop = min(len(text), open_pos + 1 + limit)
    for m in _BRACE_RE.finditer(text, open_pos, stop):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : m.start()], True, m.end()
        # "\\" (a LaTeX line break) and escaped braces "\{" "\}" do not count
    if stop < len(text):
        return text[open_pos + 1 : stop], False, stop
    return None, False, len(text)


def _box_starts_from_end(text: str, hi: int | None = None, max_looks: int = 16):
    """(start, end) of `\\boxed` / `\\fbox` commands before `hi`, last first (a few rfind calls)."""
    hi = len(text) if hi is None else hi
    found = {k: text.rfind(k, 0, hi) for k in ("\\boxed", "\\fbox")}
    for _ in range(max_looks):
        key = max(found, key=found.__getitem__)
        i = found[key]
        if i < 0:
            return
        m = _BOX_RE.match(text, i)
        if m:
            yield i, m.end()
        found[key] = text.rfind(key, 0, i)


def _box_at(text: str, end: int) -> tuple[str | None, int, bool]:
    """(content, end of the box, truncated) for a box command ending at `end`; content None: none there."""
    n = len(text)
    j = end
    while j < n and j < end + 64 and text[j] in " \t":
        j += 1
    if j < n and text[j] == "{":
        content, closed, stop = _balanced_from(text, j, MAX_ANSWER_CHARS + 1)
        if content is None:
            return None, stop, True
        return (content.strip() if closed else content), stop, False
    if end < n and text[end] in " \t":
        m = _BOX_BARE_RE.match(text, end)
        if m:
            return m.group(1), m.end(), False
    return None, end, False


def _last_box(text: str) -> tuple[str | None, int, int, bool]:
    """(content, start, end, truncated) of the last well-formed box; truncated: the very last box is open."""
    truncated = False
    for tries, (start, end) in enumerate(_box_starts_from_end(text)):
        if tries >= _MAX_BOX_TRIES:
            break
        content, stop, open_ = _box_at(text, end)
        if tries == 0 and open_:
            truncated = True
        if content is not None:
            return content, start, stop, truncated
    return None, -1, -1, truncated


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in text (brace-balanced), else None.

    `\\boxed 5` (no braces) is accepted too. When the last box is unbalanced (a truncated
    completion) the previous one is tried, a few times at most. A box whose content runs past
    MAX_ANSWER_CHARS is returned cut to MAX_ANSWER_CHARS + 1 characters (so it is judged over-long),
    which keeps the cost bounded whatever the input.
    """
    if not text:
        return None
    return _last_box(text)[0]


def _joined_boxes(text: str, content: str, start: int) -> str:
    """The last box with the boxes written right before it as parts of the same answer: `1, 2`."""
    if not content:
        return content
    parts = [content]
    for prev_start, prev_end in _box_starts_from_end(text, start, max_looks=2 * _MAX_JOINED_BOXES):
        if len(parts) >= _MAX_JOINED_BOXES:
            break
        prev, stop, _ = _box_at(text, prev_end)
        if prev is None or not prev or stop > start or not _BOX_SEP_RE.fullmatch(text, stop, start):
            break
        parts.append(prev)
        start = prev_start
    uniq = list(dict.fromkeys(clean_answer(p) for p in reversed(parts)))
    joined = ", ".join(uniq)
    return joined if len(joined) <= MAX_ANSWER_CHARS else content


def strip_delims(s: str) -> str:
    """`$x$`, `$$x$$`, `\\(x\\)`, `\\[x\\]`, `**x**` -> `x` (a few layers)."""
    s = s.strip()
    for _ in range(4):
        for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b) and not s.endswith("\\" + b):
                s = s[len(a) : len(s) - len(b)].strip()
                break
        else:
            break
    return s


def clean_answer(s: str) -> str:
    """Delimiters and trailing sentence punctuation off an answer string."""
    s = strip_delims(s)
    t = s.rstrip(" \t.,;")
    if t.endswith("\\"):  # keep "\;" "\," spacing commands whole
        t = s
    return strip_delims(t) if t else s


def _find_unescaped(s: str, sub: str, start: int) -> int:
    k = s.find(sub, start)
    while k > 0 and s[k - 1] == "\\":
        k = s.find(sub, k + 1)
    return k


def _inline_maths(text: str):
    """(start, end, content) of inline math spans, in order."""
    for m in _INLINE_MATH_RE.finditer(text):
        content = next(g for g in m.groups() if g is not None).strip()
        if content:
            yield m.start(), m.end(), content


def _is_prose(s: str) -> bool:
    """Words outside math and `\\text{}`: a sentence rather than an answer."""
    bare = _TEXT_GROUP_RE.sub(" ", _INLINE_MATH_RE.sub(" ", s))
    return bool(_PROSE_RE.search(bare))


def _last_math_or_number(s: str) -> str | None:
    """The answer inside a sentence: its last inline math expression or number, whichever comes last."""
    best_pos, best = -1, None
    spans = []
    for start, end, content in _inline_maths(s):
        spans.append((start, end))
        if not _BARE_NAME_RE.fullmatch(content):
            best_pos, best = start, clean_answer(content)
    k = 0
    for m in _LAST_NUMBER_RE.finditer(s):
        while k < len(spans) and spans[k][1] <= m.start():
            k += 1
        inside = k < len(spans) and spans[k][0] <= m.start() < spans[k][1]
        if not inside and m.start() > best_pos:
            best_pos, best = m.start(), m.group().replace(",", "")
    return best


def _answer_is_content(raw: str) -> str:
    """The answer inside the rest of an "answer is ..." line."""
    raw = raw.strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if raw.startswith(a):
            k = _find_unescaped(raw, b, len(a))
            if k > len(a):
                return clean_answer(raw[len(a) : k])
    # up to the end of the sentence: ". " or " (" or the end of line
    cut = len(raw)
    for stop in (". ", "; ", " because", " since"):
        k = raw.find(stop)
        if 0 <= k < cut:
            cut = k
    sentence = raw[:cut]
    if _is_prose(sentence):  # "The largest $n$ is 34." -> 34
        inner = _last_math_or_number(sentence)
        if inner:
            return inner
    ans = clean_answer(sentence)
    # "5 apples" -> "5": drop trailing plain words after a leading non-word answer (not inside braces)
    if ans and not ans[0].isalpha():
        m = _WORD_AFTER_RE.search(ans)
        if m and m.start() > 0 and ans.count("{", 0, m.start()) == ans.count("}", 0, m.start()):
            ans = clean_answer(ans[: m.start()])
    return ans


def _answer_is(text: str) -> tuple[str | None, int, str]:
    """(content, position of the word "answer", the raw rest of the line) of the last "answer is ..."."""
    starts = [m for m in _ANSWER_WORD_RE.finditer(text)]
    for m in reversed(starts):  # the last one with content: read from the end
        t = _ANSWER_TAIL_RE.match(text, m.end())
        if t:
            content = _answer_is_content(t.group(1))
            if content:
                return content, m.start(), t.group(1)
    return None, -1, ""


def choice_letter(s: str | None) -> str | None:
    """'C', '(C)', '\\text{(C)}', 'C) 42', 'c.' -> 'C'; anything else -> None."""
    if not s:
        return None
    s = _CHOICE_TEXT_CMDS.sub("", s[:200]).replace("}", "").replace("{", "")
    s = strip_delims(s).strip().strip("*").strip()
    m = _CHOICE_LETTER_RE.match(s) or _CHOICE_LOWER_RE.fullmatch(s)  # lower case only alone: "a" is a word
    return m.group(1).upper() if m else None


def _last_number(text: str) -> tuple[str | None, int]:
    last = None
    for m in _LAST_NUMBER_RE.finditer(text):
        last = m
    if last is None:
        return None, -1
    return last.group().replace(",", ""), last.start()


def _last_inline_math(text: str) -> tuple[str | None, int, int]:
    """(content, start, end) of the last inline math expression that is not a bare name."""
    best = (None, -1, -1)
    for start, end, content in _inline_maths(text):
        if not _BARE_NAME_RE.fullmatch(content) and not _BOX_RE.search(content):
            best = (clean_answer(content), start, end)
    return best


def _states_answer(said: str, raw: str, answer_type: str) -> bool:
    """A later "answer is" line that overrides a box: it starts with the answer ("... is 7", "Answer:
    $x$", "is (D)"), not with words ("This answer is consistent with the 3 cases")."""
    first = raw.lstrip(" *_")[:1]
    if not first or first.isalpha():
        return answer_type == "choice" and _CHOICE_LETTER_RE.match(raw.lstrip(" *_")) is not None
    return answer_type == "choice" or bool(_MATHY_RE.search(said))


def check_type_mode(answer_type: str, mode: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def extract_answer(text: str, answer_type: str = "math", mode: str = "fallback") -> tuple[str | None, str | None]:
    """Return (answer, rule) from a completion, or (None, None).

    Rules (see the module doc): the last of "boxed" / "answer_is"; in mode "fallback" also "choice"
    (choice items) or "last_math" / "last_number" (math items). For choice items the answer is the
    letter A-D.
    """
    check_type_mode(answer_type, mode)
    if not text:
        return None, None
    seg = final_segment(text)
    boxed, box_start, _box_end, truncated = _last_box(seg)
    box_ans = None
    if boxed is not None:
        if answer_type == "choice":
            box_ans = choice_letter(boxed)
        else:
            box_ans = _joined_boxes(seg, clean_answer(boxed), box_start)
    base = max(0, len(seg) - MAX_SCAN_CHARS)
    tail = seg[base:]
    said, said_pos, said_raw = _answer_is(tail)
    said_ans = None
    if said:
        said_ans = choice_letter(said) if answer_type == "choice" else said
    if box_ans and said_ans and said_pos + base > box_start and _states_answer(said, said_raw, answer_type):
        return said_ans, "answer_is"  # a final statement after an intermediate box
    if box_ans:
        return box_ans, "boxed"
    if said_ans:
        return said_ans, "answer_is"
    if mode == "strict" or truncated:
        return None, None
    if answer_type == "choice":
        best = None
        for rx in (_CHOICE_PAREN_RE, _CHOICE_LINE_RE):
            for m in rx.finditer(tail):
                if best is None or m.start() > best.start():
                    best = m
        return (best.group(1), "choice") if best else (None, None)
    num, num_pos = _last_number(tail)
    near = max(0, len(tail) - _MAX_MATH_SCAN)  # the final lines: where a closing expression stands
    maths, _m_start, m_end = _last_inline_math(tail[near:])
    if maths and num_pos < near + m_end:  # no bare number after the last inline expression
        return maths, "last_math"
    return (num, "last_number") if num else (None, None)


def looks_like_bare_answer(text: str) -> bool:
    """A short one-line string that is an answer rather than prose (for records that carry either);
    words inside `\\text{}` are an answer (`\\text{Monday and Tuesday}`), not prose."""
    s = text.strip()
    return 0 < len(s) <= 120 and "\n" not in s and not _PROSE_RE.search(_TEXT_GROUP_RE.sub(" ", s))
