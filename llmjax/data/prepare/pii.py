"""The `pii` curation stage: e-mail addresses, IP addresses and phone numbers replaced by placeholders.

Regular expressions find candidates; IP candidates are kept only if `ipaddress` parses them (so
`999.1.1.1` or a Python slice `x[1::2]` is left alone) and phone candidates only with 7 to 15
digits. Replacements are fixed strings (`<EMAIL>`, `<IP>`, `<PHONE>`), so the output depends on
the text alone, never on which worker scrubbed it. E-mails are replaced first (an address may
hold digits), then IP addresses, then phone numbers (a dotted IPv4 is never read as a phone).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>"}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,63}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"  # +44 20 7946 0958, +1-202-555-0143
    r"|\(\d{3}\) ?\d{3}[ .-]\d{4}"  # (202) 555-0143
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 202-555-0143, 202.555.0143
    r")(?![\w])")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    groups = [g for g in text.split(":") if g]
    return len(groups) >= 3 or any(len(g) >= 3 for g in groups)  # not a slice such as 1::2


def _is_phone(text: str) -> bool:
    return 7 <= sum(c.isdigit() for c in text) <= 15


# A cheap pattern that finds every match of the precise one (and more): the precise pattern runs only on the lines
# that hold one, which gives the same result (no match spans lines) several times faster.
_FAST = {
    _EMAIL: re.compile(r"[A-Za-z0-9._%+-]@[A-Za-z0-9-]+\."),
    _IPV4: re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d"),
    _IPV6: re.compile(r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:"),
    _PHONE: re.compile(r"[+(\d][\d()+ .-]{6,}\d"),
}
# kind -> (pattern, a check of each match)
_KINDS: dict[str, list[tuple[re.Pattern[str], Callable[[str], bool] | None]]] = {
    "email": [(_EMAIL, None)],
    "ip": [(_IPV4, None), (_IPV6, _is_ipv6)],
    "phone": [(_PHONE, _is_phone)],
}


def _replace(pattern: re.Pattern[str], check: Callable[[str], bool] | None, placeholder: str,
             text: str) -> tuple[str, int]:
    """`text` with the matches of `pattern` that pass `check` replaced, on the lines `_FAST[pattern]` points at."""
    n = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal n
        if check is not None and not check(m.group(0)):
            return m.group(0)
        n += 1
        return placeholder

    out, pos = [], 0
    for m in _FAST[pattern].finditer(text):
        if m.start() < pos:
            continue  # on a line already scrubbed
        start = text.rfind("\n", 0, m.start()) + 1
        end = text.find("\n", m.end())
        end = len(text) if end < 0 else end
        out += [text[pos:start], pattern.sub(sub, text[start:end])]
        pos = end
    if not out:
        return text, 0
    out.append(text[pos:])
    return "".join(out), n


class PiiScrubber:
    """Replaces the `kinds` (email, ip, phone) of personal data in a text by their placeholders."""

    def __init__(self, kinds: Sequence[str]):
        self.kinds = [k for k in PLACEHOLDERS if k in kinds]

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """The text with every match replaced, and the number of replacements per kind (kinds with none left out)."""
        counts: dict[str, int] = {}
        for kind in self.kinds:
            for pattern, check in _KINDS[kind]:
                text, n = _replace(pattern, check, PLACEHOLDERS[kind], text)
                if n:
                    counts[kind] = counts.get(kind, 0) + n
        return text, counts
