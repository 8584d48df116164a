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


# Phone classes by manner, place and voicing: candidate labels for features that answer to several phones
# (published Whisper-tiny neuron descriptions read like "sh/ch" or "k/g"). Each maps to ARPAbet members.
PHONE_CLASSES: dict[str, frozenset[str]] = {name: frozenset(members.split()) for name, members in {
    "vowel": "aa ae ah ao aw ay eh er ey ih iy ow oy uh uw",
    "front vowel": "ae eh ey ih iy",
    "back vowel": "aa ao ow uh uw",
    "diphthong": "aw ay ey ow oy",
    "plosive": "p b t d k g",
    "voiceless plosive": "p t k",
    "voiced plosive": "b d g",
    "bilabial plosive": "p b",
    "alveolar plosive": "t d",
    "velar plosive": "k g",
    "fricative": "f v th dh s z sh zh hh",
    "voiceless fricative": "f th s sh hh",
    "voiced fricative": "v dh z zh",
    "labiodental fricative": "f v",
    "dental fricative": "th dh",
    "sibilant": "s z sh zh ch jh",
    "alveolar sibilant": "s z",
    "postalveolar": "sh zh ch jh",
    "affricate": "ch jh",
    "nasal": "m n ng",
    "liquid": "l r",
    "glide": "w y",
    "bilabial": "p b m w",
    "velar": "k g ng",
    "voiceless obstruent": "p t k ch f th s sh hh",
    "voiced obstruent": "b d g jh v dh z zh",
}.items()}
assert all(members <= ARPABET for members in PHONE_CLASSES.values())
