"""The phone inventory FREUD uses: the 39 ARPAbet phones of CMUdict, lower-case, no stress digits."""

from __future__ import annotations

ARPABET = frozenset(
    "aa ae ah ao aw ay b ch d dh eh er ey f g hh ih iy jh k l m n ng ow oy p r s sh t th uh uw v w y z zh".split()
)
# Festival's "radio" phone set (CMU lexicon) adds reduced and syllabic variants; fold them into ARPAbet.
_FESTIVAL_EXTRA = {"ax": "ah", "axr": "er", "ix": "ih", "dx": "t", "el": "l", "em": "m", "en": "n", "nx": "n", "hv": "hh"}
# Silences and breaths carry no phone label.
SILENCE = frozenset({"pau", "h#", "brth", "sil", "sp", "spn", "<sil>"})


def to_arpabet(phone: str) -> str | None:
    """Map a Festival or CMU phone ("AX", "ey1", "pau") to lower-case ARPAbet; None for silence."""
    phone = phone.lower().rstrip("012")
    if phone in SILENCE:
        return None
    phone = _FESTIVAL_EXTRA.get(phone, phone)
    if phone not in ARPABET:
        raise ValueError(f"unknown phone {phone!r}; expected one of {sorted(ARPABET)}")
    return phone
