"""Check the DreamBooth unique token: it should be a rare word the model has no meaning for.

DreamBooth (Ruiz et al. 2022, section 4.1) binds the subject to a rare identifier; a common
word ("dog", "red", "my") already means something, so training overwrites that meaning.
"""

from __future__ import annotations

import re

# Frequent English words (function words, frequent nouns, adjectives and verbs, and the
# subject classes people train most). Not exhaustive: it catches the usual mistakes.
COMMON_WORDS = frozenset(
    """
    a an the of in on at to for from with by about as into over under near and or but not no nor so
    this that these those it its he she they we you i me my your his her our their them him us who
    is are was were be been being am do does did have has had will would can could should may might
    photo photograph picture image portrait drawing painting render style shot closeup close up
    one two three some any all many much more most very new old good bad best big small little large
    tiny huge long short tall high low young old happy sad beautiful pretty cute ugly nice great
    red orange yellow green blue purple pink brown black white gray grey gold silver dark light bright
    man woman men women boy girl child children kid baby person people guy lady face head hair eye eyes
    dog dogs puppy cat cats kitten animal bird fish horse cow pig sheep bear lion tiger fox wolf rabbit
    mouse duck chicken monkey toy teddy doll robot car truck bike bicycle bus train plane boat ship
    house home building room door window wall floor table chair bed sofa couch desk lamp cup mug glass
    bottle bowl plate box bag shoe shoes shirt dress hat coat jacket watch ring clock phone book pen
    tree trees flower flowers plant grass leaf forest garden park field mountain hill river lake sea
    ocean beach sand sun moon star stars sky cloud clouds rain snow water fire ice rock stone road
    street city town village world earth space night day morning evening time year life love art
    food cake bread apple banana pizza coffee tea wine sneaker backpack vase candle teapot sunglasses
    thing things object place way part side end top bottom front back left right middle center
    make made get got take see look like know think go come want use find give tell work call try
    run walk sit stand play eat drink sleep fly swim jump hold wear ride read write sing dance
    model subject token concept character figure statue sculpture logo icon pattern design
    first last next other same different real true full free open own sure able only just also
    well still even back here there now then when where why how what which while after before
    up down out off again once every each both few such than too
    """.split()
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_<>'-]+", text.lower())


def unique_token_warning(instance_prompt: str, class_prompt: str | None = None) -> str | None:
    """A one-line warning when the instance prompt has no rare word outside the class prompt."""
    class_words = set(_words(class_prompt or ""))
    candidates = [w for w in _words(instance_prompt) if w not in class_words]
    if any(w not in COMMON_WORDS for w in candidates):
        return None
    if not candidates:
        return (
            "instance_prompt: no unique token; add a rare word for the subject, e.g. "
            "'a photo of sks dog' with class prompt 'a photo of dog'"
        )
    word = next((w for w in candidates if w not in {"a", "an", "the", "of", "photo"}), candidates[0])
    return (
        f"instance_prompt: unique token {word!r} is a common English word, so training overwrites "
        "what it means; use a rare token such as 'sks' or 'ohwx'"
    )
