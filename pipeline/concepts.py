"""Concept extraction: object nouns from captions, reduced to singular lemmas, and the concept pool.

Two parsers (``concepts.parser``):

- ``spacy_model``: a trained spaCy English pipeline (``en_core_web_sm`` or larger) when it is installed:
  the heads of noun chunks plus their noun compounds ("stop sign" -> stop, sign), lemmatized by the
  pipeline. The best precision, but the package is not on PyPI (it is a GitHub release).
- ``lookups``: an offline extractor built only from what PyPI carries: spaCy's English tokenizer and
  the ``spacy-lookups-data`` tables (WordNet's noun/verb/adjective/adverb word lists, lemma rules and
  exceptions). A word is a noun candidate when it (or its rule lemma) is in the noun list; words that
  are also verbs or adjectives are decided by the neighbouring words (a determiner or number before
  -> noun; a noun before and a verb form -> verb; an adjective directly before a noun -> modifier) and,
  where the neighbours do not decide, by the class of the word's Brown cluster (word priors below).
  No statistical tagger: lower precision on real captions (see docs/concepts.md for figures).

``auto`` picks the trained pipeline when ``spacy.util.is_package(spacy_model)`` and the lookups
extractor otherwise.

    parser = load_parser(manifest.concepts)
    nouns = parser.extract_nouns(["two dogs", "a dog's bone"])   # [["dog"], ["dog", "bone"]]
    pool = build_pool(Counter(...), manifest.concepts, vocabulary=[...])
"""
from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

from pipeline.sidecars import read_caption_nouns, shard_captions, write_caption_concepts, write_caption_nouns

# Bump when extraction changes, so cached per-shard nouns are recomputed.
EXTRACTOR_VERSION = 2

# Nouns that name no object: picture types, layout words, quantities, time. Captions of web images
# (CC3M) are full of them. `concepts.stopwords` adds to this list.
NON_OBJECT_NOUNS: frozenset[str] = frozenset("""
image photo photograph picture pic illustration view background foreground stock vector style art
design day time scene closeup close shot cartoon drawing painting wallpaper pattern icon concept
front side top bottom middle center centre left right edge corner end part piece area
group pair couple lot lots bunch number set kind type sort way thing something stuff
color colour shape texture line look version template theme idea copy space text word
today year night morning evening week moment life world
sketch watercolor watercolour poster clip clipart gradient pixel comic grunge favourite favorite
""".split())

# Words that decide an ambiguous neighbour: determiners, numbers, possessives, prepositions.
_DETERMINERS = frozenset("""a an the this that these those my your his her its our their some many several
few any each every no one two three four five six seven eight nine ten eleven twelve twenty dozen
's ' another other both all more most such""".split())
_SINGULAR_DETERMINERS = frozenset("a an the this that one each every 's his her its my your our their".split())
_PREPOSITIONS = frozenset("""in on at of with near under over above below behind beside besides between
among into onto from by for to against along across around through inside outside beneath
without within upon via and or past toward towards beyond throughout amid amidst atop underneath
alongside during""".split())
# Particles and object pronouns: a verb form directly before one has an object or a particle
# ("holding a cup", "taking off", "hugging him"), so it is a verb there, not a noun.
_PARTICLES = frozenset("up down off out away back".split())
_OBJECT_PRONOUNS = frozenset("him her them it me us you himself herself themselves itself".split())
_SUBJECT_PRONOUNS = frozenset("he she it they we i you who which that".split())
_BE_WORDS = frozenset("is are was were be been being am 's 're can will may might could would "
                      "should does do did has have had to".split())



# -- name clean-up (docs/method.md §1) --------------------------------------------------------------

def clean_name(name: str) -> str:
    """A class or concept name as it goes into a prompt: commas stripped, '_' and '+' become spaces,
    parentheses removed (their words kept: LVIS 'bow_(weapon)' -> 'bow weapon'), spaces collapsed."""
    name = name.replace(",", " ").replace("_", " ").replace("+", " ").replace("(", " ").replace(")", " ")
    return " ".join(name.split())


def normalize_concept(name: str) -> str:
    """The pool's spelling of a name: cleaned, lower case."""
    return clean_name(name).lower()


# -- the lookups tables ---------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _lookup_tables() -> dict:
    import spacy_lookups_data

    folder = Path(spacy_lookups_data.__file__).parent / "data"

    def load(name):
        with gzip.open(folder / f"en_{name}.json.gz", "rt", encoding="utf-8") as f:
            return json.load(f)

    index = {pos: frozenset(words) for pos, words in load("lemma_index").items()}
    exc = load("lemma_exc")
    rules = load("lemma_rules")
    return {"index": index, "exc": exc, "rules": rules, "lookup": load("lemma_lookup")}


def _rule_lemma(word: str, pos: str, tables: dict) -> Optional[str]:
    """The lemma of `word` as part of speech `pos` if the word is one, else None."""
    exc = tables["exc"].get(pos, {})
    if word in exc:
        return exc[word][0]
    index = tables["index"].get(pos, frozenset())
    if pos == "noun":
        # spaCy's lookup lemma first: "hearts" and "glasses" are WordNet nouns of their own.
        lemma = tables["lookup"].get(word)
        if lemma is not None and lemma != word and word.endswith("s") and lemma in index:
            return lemma
    if word in index:
        return word
    for old, new in tables["rules"].get(pos, []):
        if old and word.endswith(old):
            candidate = word[: len(word) - len(old)] + new
            if candidate in index:
                return candidate
    return None


# -- word-class priors from word clusters -------------------------------------------------------------
#
# Context decides most words ("a dog", "is running", "red apple"), but not all: "walking along the
# beach", "actor poses on the carpet", "a wedding cake" against "a smiling sun". Where context is
# silent the tagger asks which class a word's distributional neighbours are: spacy-lookups-data's
# Brown clusters (en_lexeme_cluster: words used alike in a large web corpus share a cluster) hold
# "walking" with "running, playing, eating" (verbs) and "wedding" with "dog, house, birthday" (nouns).
# Loading the cluster table takes seconds and about a gigabyte, so the priors it gives are derived
# once (`build_word_priors`) into a small table shipped with the package.

WORD_PRIORS = Path(__file__).with_name("data") / "en_word_priors.tsv.gz"
_NOUN_SHARE = 0.7        # a cluster votes noun at >= 70% nouns among its one-reading members, not-noun at <= 30%
_CLUSTER_MIN_VOTES = 4   # members with one reading a cluster needs to vote; fewer: its parent cluster votes


def _cluster_parent(cluster: int) -> int:
    """The enclosing Brown cluster: spaCy stores a cluster's bit path reversed as an int, so the last
    step of the path is the highest bit."""
    return cluster & ~(1 << (cluster.bit_length() - 1))


def build_word_priors(out: Path = WORD_PRIORS) -> dict[str, str]:
    """Derive the word-class priors from the installed spacy-lookups-data and write them to `out`
    (gzipped TSV `word<TAB>noun|verb|adj`). A cluster's vote: the class of its members that WordNet
    gives one reading only (noun, verb or adjective), a noun at >= 70% nouns, else the larger of verb
    and adjective at <= 30% nouns, else none. Written for each word with a noun reading and another
    one ("walking", "poses", "wedding"). Rebuild with
    `python -c "from pipeline.concepts import build_word_priors as b; b()"`."""
    import spacy_lookups_data

    from pipeline.io import write_bytes

    folder = Path(spacy_lookups_data.__file__).parent / "data"
    with gzip.open(folder / "en_lexeme_cluster.json.gz", "rt", encoding="utf-8") as f:
        clusters = {w: c for w, c in json.load(f).items() if c and re.fullmatch(r"[a-z]+", w)}
    tables = _lookup_tables()
    readings = {w: [pos for pos in ("noun", "verb", "adj") if _rule_lemma(w, pos, tables)] for w in clusters}
    votes: dict[int, Counter] = {}
    for word, cluster in clusters.items():
        if len(readings[word]) == 1:
            votes.setdefault(cluster, Counter())[readings[word][0]] += 1

    def vote(cluster: int) -> Optional[str]:
        while cluster:
            counts = votes.get(cluster, Counter())
            total = sum(counts.values())
            if total >= _CLUSTER_MIN_VOTES:
                if counts["noun"] >= _NOUN_SHARE * total:
                    return "noun"
                if counts["noun"] <= (1 - _NOUN_SHARE) * total:
                    return "verb" if counts["verb"] >= counts["adj"] else "adj"
                return None
            cluster = _cluster_parent(cluster)
        return None

    priors = {}
    for word in sorted(clusters):
        if "noun" not in readings[word]:
            continue
        role = vote(clusters[word])
        if role is not None and len(readings[word]) > 1:
            priors[word] = role
    version = getattr(spacy_lookups_data, "__version__", "?")
    lines = [f"# word-class priors from spacy-lookups-data {version} (pipeline.concepts.build_word_priors)"]
    lines += [f"{w}\t{r}" for w, r in priors.items()]
    write_bytes(Path(out), gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0))
    return priors


@lru_cache(maxsize=1)
def _word_priors() -> dict[str, str]:
    with gzip.open(WORD_PRIORS, "rt", encoding="utf-8") as f:
        return dict(line.rstrip("\n").split("\t") for line in f if not line.startswith("#"))


@dataclass
class _Word:
    text: str                      # lower case
    noun: Optional[str] = None     # noun lemma if the word can be a noun
    verb: bool = False
    adj: bool = False
    adv: bool = False
    function: bool = False         # stop word, number, punctuation
    prior: Optional[str] = None    # what the word's cluster mostly is: noun, verb, adj (None: undecided)
    unknown: bool = False          # in no WordNet list ("smartphone"): `noun` holds a guessed lemma

    @property
    def participle(self) -> bool:
        """An -ing or -ed form of a verb ("walking", "parked"), whether or not WordNet lists it as a noun."""
        return self.verb and self.text.endswith(("ing", "ed"))

    @property
    def inflected(self) -> bool:
        """A plural noun form ("dogs", "children")."""
        return self.noun is not None and self.text != self.noun


class LookupsTagger:
    """Noun lemmas of a tokenized caption from WordNet word lists, neighbour rules and, where the
    neighbours do not decide, the word's cluster prior (no model)."""

    def __init__(self):
        from spacy.lang.en.stop_words import STOP_WORDS

        self.tables = _lookup_tables()
        self.priors = _word_priors()
        self.stop = frozenset(STOP_WORDS) | _DETERMINERS | _PREPOSITIONS | _BE_WORDS
        self._cache: dict[str, _Word] = {}

    def word(self, text: str) -> _Word:
        w = self._cache.get(text)
        if w is not None:
            return w
        w = _Word(text)
        if text in self.stop or not re.fullmatch(r"[a-z][a-z\-]*[a-z]|[a-z]", text):
            w.function = True
        else:
            t = self.tables
            w.noun = _rule_lemma(text, "noun", t)
            w.verb = _rule_lemma(text, "verb", t) is not None
            w.adj = _rule_lemma(text, "adj", t) is not None
            w.adv = _rule_lemma(text, "adv", t) is not None
            w.prior = self.priors.get(text)
            if w.noun is None and not (w.verb or w.adj or w.adv) and "-" not in text:
                w.unknown = True                         # a newer word or a name: a noun only where placed as one
                lemma = t["lookup"].get(text, text)
                w.noun = lemma[:-1] if lemma == text and text.endswith("s") and not text.endswith("ss") else lemma
        if len(self._cache) < 200_000:
            self._cache[text] = w
        return w

    def nouns(self, tokens: Sequence[str]) -> list[str]:
        words = [self.word(t.lower()) for t in tokens]
        # Per word: "noun"; "mod" (a noun-or-adjective modifying the next noun); "adj" (an
        # adjective-only word); "verb" (a verb form that takes an object or a particle); "other".
        acting = [self._acts_as_verb(words, i) for i in range(len(words))]
        tags: list[str] = []
        for i in range(len(words)):
            tags.append("verb" if acting[i] else self.tag(words, tags, i, acting))
        return [w.noun for w, tag in zip(words, tags) if tag == "noun"]

    @staticmethod
    def _acts_as_verb(words: list[_Word], i: int) -> bool:
        """A participle, or a word whose cluster is verbs, directly followed by a determiner, an object
        pronoun or a particle, with no determiner before it: "holding a cup", "taking off", "reads a
        book", but not "the painting a child made"."""
        w = words[i]
        if not (w.participle or (w.verb and w.prior == "verb")) or i + 1 >= len(words):
            return False
        nxt = words[i + 1].text
        after_determiner = i > 0 and words[i - 1].text in _DETERMINERS
        return not after_determiner and (nxt in _DETERMINERS or nxt in _OBJECT_PRONOUNS or nxt in _PARTICLES)

    @staticmethod
    def _reaches_noun(words: list[_Word], j: int, acting: Sequence[bool]) -> Optional[int]:
        """The index of the noun if words[j:] start with adjectives then a noun ("shiny car"), else None."""
        while j < len(words) and not words[j].function and not acting[j]:
            if words[j].noun is not None and not words[j].adj:
                return j
            if not words[j].adj:
                return None
            if words[j].noun is not None and (j + 1 >= len(words) or words[j + 1].noun is None):
                return j                                   # "blue star" ends the phrase: a noun
            j += 1
        return None

    def tag(self, words: list[_Word], tags: list[str], i: int, acting: Sequence[bool]) -> str:
        w = words[i]
        prev = words[i - 1] if i > 0 else None
        prev_tag = tags[i - 1] if i > 0 else None
        if w.function:
            return "other"
        if w.unknown:                                     # "a smartphone", "her new hoodie"
            placed = prev is not None and (prev.text in _DETERMINERS or prev.text.isdigit()
                                           or prev_tag in ("mod", "adj"))
            ends = i + 1 >= len(words) or words[i + 1].function
            return ("noun" if ends else "mod") if placed else "other"   # "a crunchy carrot": a modifier
        if w.noun is None:
            return "adj" if w.adj else "other"
        if not (w.verb or w.adj or w.adv):
            return "noun"                                 # only ever a noun
        before = words[i - 2].text if i >= 2 else ""
        nxt = words[i + 1] if i + 1 < len(words) else None
        phrase_ends = nxt is None or nxt.function
        if w.adv and w.text.endswith("ly"):
            return "other"
        if w.adj and self._reaches_noun(words, i + 1, acting) is not None:
            return "mod"                                  # "red apple", "blue shiny car": a modifier
        head = (self._reaches_noun(words, i + 2, acting) if w.adj and nxt is not None and nxt.text in ("and", "or")
                and prev_tag not in ("mod", "adj") else None)
        if head is not None and not (prev is not None and prev.text in ("a", "an", "one")
                                     and words[head].text != words[head].noun):
            return "mod"                                  # "red and blue kite", not "a star and blue lines"
        if w.verb and w.text.endswith("ing") and nxt is not None and not nxt.function and nxt.noun is not None:
            # "sailing boat", "smiling sun"; but "wedding cake", "swimming pool" (noun compounds)
            return "noun" if w.prior == "noun" else "mod"
        if w.participle and nxt is not None and nxt.adv and nxt.noun is None:
            return "other"                                # "running quickly"
        if prev is None:
            # "walking along the beach" (a verb-like word alone), but "stop sign" (a compound)
            return "other" if w.prior in ("verb", "adj") and phrase_ends else "noun"
        if prev.text == "'s" and i >= 2 and tags[i - 2] == "noun":
            return "noun"                                 # possessive: "a dog's bone"
        if prev.text == "to" and before in ("next", "close", "up", "due"):
            return "noun"                                 # "next to bottles"
        if prev.text in _BE_WORDS and (w.verb or w.adj):
            return "other"                                # "is running", "are white", "to sign"
        if prev.text in _DETERMINERS or prev.text.isdigit():
            return "noun"                                 # "a dog", "two runs"
        if prev.text in _PREPOSITIONS:
            # "with apples", "in the rain"; a gerund after one is an action: "for walking"
            return "other" if w.participle and w.prior != "noun" else "noun"
        if prev_tag in ("mod", "adj"):
            return "noun"                                 # the head of "white building"
        if w.verb and prev.text in _SUBJECT_PRONOUNS:
            return "other"                                # "he signs"
        if w.verb and prev_tag == "noun":
            # "a man rides", "dogs running", "dogs run"; but "stop sign", "two glass bottles" (compounds).
            if w.participle:
                return "other"
            if prev.inflected and w.text == w.noun:
                return "other"                            # a plural subject and a bare verb: "waves crash"
            if w.inflected and w.text.endswith("s") and (
                    before in _SINGULAR_DETERMINERS
                    or (w.prior == "verb" and (i < 2 or tags[i - 2] not in ("mod", "adj")))):
                return "other"                            # "a man rides", "actor poses"; not "soft cartoon clouds"
            return "noun"
        if w.participle and (w.text != w.noun or w.prior != "noun"):
            return "other"                                # "while walking", "and looking"
        if w.adj and not w.verb and not phrase_ends and w.prior != "noun":
            return "other"
        return "other" if w.prior in ("verb", "adj") and phrase_ends else "noun"


# -- parsers ----------------------------------------------------------------------------------------

@dataclass
class NounParser:
    """`extract_nouns(texts)`: the object-noun lemmas of each text, in order (repeats kept)."""
    kind: str                      # "spacy_model" or "lookups"
    nlp: object
    batch_size: int = 256
    model_name: str = ""
    tagger: Optional[LookupsTagger] = field(default=None, repr=False)

    @property
    def identity(self) -> dict:
        """What the extraction depends on (part of the concepts fingerprint)."""
        ident = {"parser": self.kind, "extractor_version": EXTRACTOR_VERSION}
        if self.kind == "spacy_model":
            ident["model"] = self.model_name
            ident["model_version"] = self.nlp.meta.get("version", "")
        return ident

    def extract_nouns(self, texts: Iterable[str]) -> list[list[str]]:
        texts = [t if isinstance(t, str) else "" for t in texts]
        if self.kind == "spacy_model":
            return [_trained_nouns(doc) for doc in self.nlp.pipe(texts, batch_size=self.batch_size)]
        return [self.tagger.nouns([t.text for t in doc])
                for doc in self.nlp.pipe(texts, batch_size=self.batch_size)]


def _trained_nouns(doc) -> list[str]:
    out = []
    for chunk in doc.noun_chunks:
        for token in chunk:
            if token.pos_ != "NOUN":
                continue
            if token.i == chunk.root.i or token.dep_ == "compound":
                lemma = token.lemma_.lower().strip()
                if lemma and lemma.isascii() and re.fullmatch(r"[a-z][a-z\-]*", lemma):
                    out.append(lemma)
    return out


def resolve_parser_kind(cfg) -> str:
    """The parser `cfg.parser` means here: 'spacy_model' or 'lookups'."""
    import spacy

    if cfg.parser == "lookups":
        return "lookups"
    installed = spacy.util.is_package(cfg.spacy_model)
    if cfg.parser == "spacy_model" and not installed:
        raise ValueError(
            f"concepts.parser is spacy_model but the spaCy pipeline {cfg.spacy_model!r} is not installed; "
            f"install it (pip install <path or URL of {cfg.spacy_model}-X.Y.Z.whl from "
            "github.com/explosion/spacy-models/releases>) or set concepts.parser: lookups")
    return "spacy_model" if installed else "lookups"


def load_parser(cfg) -> NounParser:
    """The noun parser for a `ConceptsConfig` (see the module docstring for the choice)."""
    import spacy

    kind = resolve_parser_kind(cfg)
    if kind == "spacy_model":
        nlp = spacy.load(cfg.spacy_model, disable=["ner", "textcat"])
        return NounParser("spacy_model", nlp, cfg.batch_size, cfg.spacy_model)
    return NounParser("lookups", spacy.blank("en"), cfg.batch_size, tagger=LookupsTagger())


# -- the pool ------------------------------------------------------------------------------------------

def stopword_set(cfg) -> frozenset[str]:
    return NON_OBJECT_NOUNS | frozenset(normalize_concept(s) for s in cfg.stopwords)


def build_pool(counts: Counter, cfg, vocabulary: Sequence[str] = (),
               vocabulary_counts: Optional[Counter] = None, pool: Optional[Sequence[str]] = None) -> list[dict]:
    """Concept rows {concept_id, name, count, source}: corpus nouns with count >= min_count (most
    frequent first, ties by name), minus non-object nouns, at most max_concepts, or instead the names of
    a given `pool` (read_pool_file) in their order, unfiltered; then vocabulary names not already in the
    pool (in their given order). ids are dense from 0 in that order. `vocabulary_counts`: the caption
    counts of multi-word names (count_phrases)."""
    vocabulary_counts = vocabulary_counts or Counter()

    def count(name: str) -> int:
        return int(counts.get(name, 0) if " " not in name else vocabulary_counts.get(name, 0))

    if pool is not None:
        rows = [{"name": n, "count": count(n), "source": "pool_file"} for n in pool]
    else:
        stop = stopword_set(cfg)
        corpus = sorted(((n, c) for n, c in counts.items() if c >= cfg.min_count and n not in stop),
                        key=lambda nc: (-nc[1], nc[0]))
        if cfg.max_concepts is not None:
            corpus = corpus[: cfg.max_concepts]
        rows = [{"name": n, "count": int(c), "source": "corpus"} for n, c in corpus]
    seen = {r["name"] for r in rows}
    for name in vocabulary:
        name = normalize_concept(name)
        if name and name not in seen:
            seen.add(name)
            rows.append({"name": name, "count": count(name), "source": "vocabulary"})
    for i, r in enumerate(rows):
        r["concept_id"] = i
    return rows


class ConceptMatcher:
    """Maps a caption (its nouns and its text) to the ids of the pool concepts it names."""

    def __init__(self, names: Sequence[str]):
        self.ids = {n: i for i, n in enumerate(names)}
        # Multi-word names (vocabulary phrases such as "hot dog") match the caption text, plural or not.
        self.phrases = [(re.compile(r"\b" + r"\s+".join(map(re.escape, n.split())) + r"(?:s|es)?\b"), i)
                        for n, i in self.ids.items() if " " in n]

    def __call__(self, nouns: Sequence[str], text: str = "") -> list[int]:
        out, seen = [], set()
        for n in nouns:
            i = self.ids.get(n)
            if i is not None and i not in seen:
                seen.add(i)
                out.append(i)
        if self.phrases and text:
            low = text.lower()
            for pattern, i in self.phrases:
                if i not in seen and pattern.search(low):
                    seen.add(i)
                    out.append(i)
        return out


def count_phrases(names: Sequence[str], texts: Iterable[str]) -> Counter:
    """How many texts name each multi-word name (plural or not)."""
    phrases = [n for n in (normalize_concept(x) for x in names) if " " in n]
    if not phrases:
        return Counter()
    patterns = {n: re.compile(r"\b" + r"\s+".join(map(re.escape, n.split())) + r"(?:s|es)?\b")
                for n in phrases}
    counts = Counter()
    for text in texts:
        low = (text or "").lower()
        for n, p in patterns.items():
            if p.search(low):
                counts[n] += 1
    return counts


# -- vocabularies (class lists) -------------------------------------------------------------------------

@dataclass
class ClassList:
    """A user's class list as given (a file, a COCO/LVIS JSON or a comma list)."""
    names: list[str]
    category_ids: Optional[list[int]] = None   # COCO/LVIS category ids, in the order of `names`
    source: str = ""


def read_vocabulary(spec: str, base: Optional[Path] = None) -> ClassList:
    """Class names from a text file (one per line, '#' comments), a COCO/LVIS JSON (its `categories`,
    sorted by id), or a comma list ("cat,dog,hot dog"). Names are kept as written (clean-up happens
    at prompt time); duplicates are refused."""
    path = Path(spec).expanduser()
    if base is not None and not path.is_absolute() and not path.exists() and (base / path).exists():
        path = base / path
    if path.is_file():
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            cats = data.get("categories") if isinstance(data, dict) else data
            if not isinstance(cats, list) or not all(isinstance(c, dict) and "name" in c for c in cats):
                raise ValueError(f"{path}: expected a COCO/LVIS JSON with a 'categories' list of "
                                 "{id, name} records")
            cats = sorted(cats, key=lambda c: c.get("id", 0))
            vocab = ClassList([str(c["name"]) for c in cats],
                               [int(c["id"]) for c in cats] if all("id" in c for c in cats) else None,
                               str(path))
        else:
            lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            vocab = ClassList([ln for ln in lines if ln], None, str(path))
    elif spec.lower().endswith((".json", ".txt")) or "/" in spec:
        raise FileNotFoundError(f"{spec}: no such class-list file (give a text file, a COCO/LVIS JSON, "
                                "or a comma list such as 'cat,dog,hot dog')")
    else:
        vocab = ClassList([s.strip() for s in spec.split(",") if s.strip()], None, "comma list")
    if not vocab.names:
        raise ValueError(f"{spec}: the class list is empty")
    lowered = [normalize_concept(n) for n in vocab.names]
    dupes = sorted({n for n in lowered if lowered.count(n) > 1})
    if dupes:
        raise ValueError(f"{spec}: duplicate class names after clean-up: {', '.join(dupes[:10])}")
    return vocab


# File suffixes of embedding files, which hold no names (the reference's pools are `.pth` tensors).
_EMBEDDING_SUFFIXES = (".pth", ".pt", ".npy", ".npz", ".safetensors")


def read_pool_file(path: Path) -> list[str]:
    """A given concept pool (concepts.pool_file): one name per line, in pool order; blank lines and '#'
    comments skipped. A line `name,count` gives its name: the reference's pool names files
    (`{coco,googlecc}_nouns_<N>.txt`, beside the `.pth` embeddings of the same names) are written so,
    and its get_cls_names reads the part before the first comma. Names are spelled as the pool spells
    them (normalize_concept); a name given twice is refused with both line numbers."""
    if path.suffix.lower() in _EMBEDDING_SUFFIXES:
        raise ValueError(f"concepts.pool_file: {path} holds embeddings, not names; give the text file of the "
                         "names, one per line (the reference's coco_nouns_4764_emb.pth is made from "
                         "coco_nouns_4764.txt)")
    if not path.is_file():
        raise FileNotFoundError(f"concepts.pool_file: {path}: no such file")
    names, line_of = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        name = normalize_concept(line.split("#", 1)[0].split(",", 1)[0])
        if not name:
            continue
        if name in line_of:
            raise ValueError(f"concepts.pool_file: {path}:{number}: {name!r} is already on line {line_of[name]}")
        line_of[name] = number
        names.append(name)
    if not names:
        raise ValueError(f"concepts.pool_file: {path}: no concept names in it")
    return names


# -- per-shard work (Ray tasks) -------------------------------------------------------------------------
#
# The concepts stage runs in two passes over the shards. Pass 1 (`extract_shard`, parallel, the cost)
# writes each caption's noun lemmas into the sidecar `concepts/captions/NNNNN.parquet` (key, nouns)
# and a marker carrying the *extraction* fingerprint (parser only). Pass 2 (`assign_shard`, cheap)
# adds each caption's pool concept ids and marks the shard done under the stage's full fingerprint.
# So changing min_count, stopwords or the vocabulary rebuilds the pool without parsing again.



@lru_cache(maxsize=4)
def _cached_parser(cfg_json: str) -> NounParser:
    from pipeline.config import ConceptsConfig

    return load_parser(ConceptsConfig(**json.loads(cfg_json)))


def read_marker(stage_dir, shard_id: int) -> Optional[dict]:
    from pipeline.io import read_json

    try:
        return read_json(stage_dir.stats(shard_id))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def extract_shard(shard_id: int, shards, sidecars, cfg_json: str, extract_fp: str) -> dict:
    """Pass 1 for one shard: noun lemmas of every written caption -> the sidecar (key, nouns)."""
    import time

    from pipeline.stage import write_shard_stats

    started = time.time()
    keys, captions = shard_captions(shards, shard_id)
    nouns = _cached_parser(cfg_json).extract_nouns(captions)
    path = write_caption_nouns(sidecars, shard_id, keys, nouns)
    counts = {"captions": len(keys), "nouns": sum(map(len, nouns))}
    # Not done under the stage's fingerprint yet (pass 2 adds concept ids); the extraction is.
    write_shard_stats(sidecars, shard_id, f"extracted-{extract_fp}", counts, [path],
                      extra={"extract_fingerprint": extract_fp}, seconds=round(time.time() - started, 3))
    return {"shard": shard_id, **counts}


def caption_counts(sidecars, shard_ids: Iterable[int]) -> Counter:
    """For each noun lemma, the number of captions that name it (a caption counts once)."""
    counts = Counter()
    for shard_id in shard_ids:
        for nouns in read_caption_nouns(sidecars, shard_id)[1]:
            counts.update(set(nouns))
    return counts


def assign_shard(shard_id: int, sidecars, matcher: ConceptMatcher, fingerprint: str, extract_fp: str,
                 shards=None) -> dict:
    """Pass 2 for one shard: add concept_ids to the sidecar and mark it done (`shards`: the shard
    stage's folder, for the caption texts that multi-word names are matched against)."""
    import time

    from pipeline.stage import forget_marker, write_shard_stats

    started = time.time()
    keys, nouns = read_caption_nouns(sidecars, shard_id)
    texts = [""] * len(nouns)
    if matcher.phrases and shards is not None:
        _, texts = shard_captions(shards, shard_id)
    ids = [matcher(n, t) for n, t in zip(nouns, texts)]
    forget_marker(sidecars, shard_id)  # pass 1's marker: a kill before the new one leaves a shard to parse
    path = write_caption_concepts(sidecars, shard_id, keys, nouns, ids)
    counts = {"captions": len(ids), "with_concepts": sum(1 for x in ids if x),
              "concept_mentions": sum(map(len, ids))}
    return write_shard_stats(sidecars, shard_id, fingerprint, counts, [path],
                             extra={"extract_fingerprint": extract_fp},
                             seconds=round(time.time() - started, 3))
