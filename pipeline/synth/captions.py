"""Captions of the synthetic world: CC3M-style, noisy, naming some or all of an image's objects.

Counts ("two", "a pair of", "3"), plurals, adjectives (the category's colour, a size, a general
word), dropped articles, left-out objects and distractor words (backgrounds, styles, picture types).
"""
from __future__ import annotations

from pipeline.synth.shapes import CATEGORIES, SceneObject

# Plurals as a caption writes them; all are plurals that spaCy's English lookup lemmatizer maps back.
PLURALS: dict[str, str] = {name: name + "s" for name in CATEGORIES}
PLURALS.update({"fish": "fish", "house": "houses"})

# Words a caption may use to describe each category (its dominant colour, mostly).
CATEGORY_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "apple": ("red", "ripe", "fresh", "juicy"), "banana": ("yellow", "ripe", "curved"),
    "kite": ("colorful", "flying", "red and blue"), "star": ("yellow", "golden", "bright"),
    "heart": ("pink", "red", "lovely"), "umbrella": ("purple", "open", "violet"),
    "cup": ("white", "ceramic", "teal"), "tree": ("green", "tall", "pine"),
    "house": ("little", "cozy", "brown"), "car": ("blue", "toy", "fast"),
    "fish": ("orange", "striped", "tropical"), "ball": ("striped", "colorful", "round"),
    "clock": ("white", "round", "old"), "bottle": ("green", "glass", "tall"),
    "key": ("silver", "metal", "old"), "flower": ("pink", "purple", "blooming"),
    "mushroom": ("red", "spotted", "wild"), "boat": ("wooden", "sailing", "brown"),
    "bell": ("golden", "bronze", "shiny"), "hat": ("black", "tall", "elegant"),
    "cloud": ("white", "fluffy", "soft"), "book": ("blue", "closed", "old"),
    "carrot": ("orange", "fresh", "crunchy"), "sun": ("yellow", "bright", "smiling"),
}
assert set(CATEGORY_ADJECTIVES) == set(CATEGORIES)

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
BACKGROUNDS = ("white", "blue", "abstract", "colorful", "grunge", "gradient", "blurred", "light",
               "dark", "pastel", "textured")
STYLES = ("watercolor", "pop art", "flat design", "pixel art", "sketch", "retro poster", "minimal",
          "comic")
GENERAL_ADJECTIVES = ("cute", "shiny", "cartoon", "simple", "bright", "hand drawn", "funny")

# `{objects}`: the object phrases joined; `{bg}` and `{style}`: distractor words.
CAPTION_TEMPLATES = (
    "{objects}",
    "a photo of {objects}",
    "{objects} on a {bg} background",
    "illustration of {objects} in the style of {style}",
    "stock image of {objects}",
    "{objects} isolated on {bg} background",
    "cartoon {objects} on a beautiful day",
    "view of {objects} against a {bg} background",
    "{objects}. vector illustration",
    "close up of {objects}",
    "there are {objects} in this picture",
    "a drawing with {objects}",
    "{objects}, {style} style",
    "clip art : {objects}",
    "wallpaper with {objects} and abstract lines",
    "{objects} -- stock photo",
    "beautiful {objects} on the {bg} background , {style} illustration",
    "a picture showing {objects}",
    "image may contain : {objects}",
    "on a {bg} background : {objects}",
    "{style} art of {objects} , nice view",
    "my favourite : {objects} ! #art #design",
)
JOINERS = (" and ", " with ", " next to ", ", ", " , ")


def _count_words(count: int, rng) -> str:
    if count == 2 and rng.random() < 0.25:
        return rng.choice(["a pair of", "a couple of"])
    if count >= 3 and rng.random() < 0.25:
        return rng.choice(["several", "some", "a group of", "many"])
    return str(count) if rng.random() < 0.2 else NUMBER_WORDS[count]


def _object_phrase(name: str, count: int, relative_size: float, rng) -> str:
    """'two red apples', 'a small banana', 'the fish', 'apples' ..."""
    adjectives = []
    if rng.random() < 0.45:
        adjectives.append(str(rng.choice(CATEGORY_ADJECTIVES[name])))
    if rng.random() < 0.2:
        adjectives.append("small" if relative_size < 0.25 else "large" if relative_size > 0.45
                          else "little")
    elif rng.random() < 0.15:
        adjectives.append(str(rng.choice(GENERAL_ADJECTIVES)))
    noun = name if count == 1 else PLURALS[name]
    words = " ".join(adjectives + [noun])
    if count == 1:
        roll = rng.random()
        if roll < 0.15:
            return words                                            # article dropped
        if roll < 0.3:
            return "the " + words
        if roll < 0.4:
            return "one " + words
        return ("an " if words[0] in "aeiou" else "a ") + words
    return words if rng.random() < 0.15 else f"{_count_words(count, rng)} {words}"


def make_caption(objects: list[SceneObject], image_size: tuple[int, int], rng) -> str:
    """A noisy CC3M-style caption that names at least one of `objects` (counts, plurals, adjectives)."""
    counts: dict[str, int] = {}
    sizes: dict[str, float] = {}
    for obj in objects:
        counts[obj.name] = counts.get(obj.name, 0) + 1
        sizes[obj.name] = max(sizes.get(obj.name, 0.0), max(obj.box[2:]) / min(image_size))
    mentioned = list(counts)
    rng.shuffle(mentioned)                                          # word order varies
    if len(mentioned) > 1 and rng.random() < 0.3:
        mentioned.pop()                                             # an object the writer left out
    phrases = [_object_phrase(name, counts[name], sizes[name], rng) for name in mentioned]
    text = phrases[0]
    for phrase in phrases[1:]:
        text += str(rng.choice(JOINERS)) + phrase
    caption = str(rng.choice(CAPTION_TEMPLATES)).format(
        objects=text, bg=rng.choice(BACKGROUNDS), style=rng.choice(STYLES))
    if rng.random() < 0.3:
        caption = caption[0].upper() + caption[1:]
    if rng.random() < 0.2:
        caption += "."
    return caption

