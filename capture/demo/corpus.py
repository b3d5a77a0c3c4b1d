"""Multi-domain text corpus for the embedded demo model, built from material on every machine.

Four domains, chosen so that a router has something real to tell apart:

``code``
    Python standard-library sources (``sysconfig.get_paths()["stdlib"]``), test suites
    excluded. Held out by *file*.
``prose``
    English reference prose from ``pydoc_data.topics`` with indented code and grammar
    blocks removed. Held out by *topic*.
``math``
    Generated arithmetic, algebra and word problems with worked answers. Held out by
    *random stream* (a separate seed) and by exact-text filtering.
``data``
    Generated structured records: JSON objects, CSV tables, INI configs and log lines.
    Held out like ``math``.

Everything is deterministic for a seed on a given Python installation (the standard
library differs between Python versions, so the code and prose domains do too).
Evaluation samples never occur in the training text: every held-out candidate whose
text is a substring of any training document is dropped at build time.
"""

from __future__ import annotations

import json
import operator
import random
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DOMAINS: tuple[str, ...] = ("code", "prose", "math", "data")
"""Domain labels in the order used everywhere (eval JSONL, training batches)."""

# Directories of the standard library left out of the code domain: test suites are huge
# and repetitive, site-packages is not the standard library, encodings/ is mostly codec
# tables, and pydoc_data/ holds the prose domain's source text as a Python string.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}
)
# Large files are cut into windows so that one module cannot dominate the code domain.
_CODE_WINDOW_CHARS = 6000


@dataclass
class Corpus:
    """Training documents and held-out evaluation samples of the demo corpus.

    Attributes
    ----------
    train : dict[str, list[str]]
        Domain -> training documents (unordered text units; the trainer packs them).
    eval_samples : list[dict]
        Held-out samples ``{"id": str, "text": str, "domain": str}``, grouped by domain in
        ``DOMAINS`` order, ``eval_samples_per_domain`` per domain.
    train_sources, eval_sources : dict[str, list[str]]
        Domain -> identifiers of where the text came from (stdlib relative paths, topic
        names, generator streams). Disjoint per domain by construction.
    """

    train: dict[str, list[str]]
    eval_samples: list[dict]
    train_sources: dict[str, list[str]] = field(default_factory=dict)
    eval_sources: dict[str, list[str]] = field(default_factory=dict)
    candidates: dict[str, list[tuple[str, str]]] = field(default_factory=dict, repr=False)
    """Domain -> held-out ``(source, text)`` candidates in preference order."""

    def select_eval(self, n_per_domain: int, fit: Callable[[str], str] | None = None) -> None:
        """(Re)choose ``eval_samples`` from the held-out candidates.

        Parameters
        ----------
        n_per_domain : int
            Samples per domain.
        fit : callable, optional
            Applied to each candidate first (e.g. trimming to the model's context); the
            leakage check runs on the fitted text, since a prefix of a clean window can
            still occur in training text.

        Raises
        ------
        ValueError
            If a domain has fewer than ``n_per_domain`` usable candidates.
        """
        # Exact leakage guard: a candidate occurring verbatim anywhere in the training
        # text (licence boilerplate, duplicated helpers, a regenerated record) is
        # dropped. NUL never occurs in the sources, so joining cannot create matches.
        haystack = "\x00".join(t for d in DOMAINS for t in self.train[d])
        samples: list[dict] = []
        sources: dict[str, list[str]] = {}
        for domain in DOMAINS:
            picked: list[tuple[str, str]] = []
            seen: set[str] = set()
            for src, text in self.candidates.get(domain, []):
                if len(picked) == n_per_domain:
                    break
                if fit is not None:
                    text = fit(text)
                if text.strip() and text not in seen and text not in haystack:
                    picked.append((src, text))
                    seen.add(text)
            if len(picked) < n_per_domain:
                raise ValueError(
                    f"corpus domain {domain!r}: only {len(picked)} held-out samples available, "
                    f"eval_samples_per_domain={n_per_domain} requested"
                )
            sources[domain] = sorted({src for src, _ in picked})
            samples.extend(
                {"id": f"{domain}-{i:03d}", "text": text, "domain": domain} for i, (_, text) in enumerate(picked)
            )
        self.eval_samples = samples
        self.eval_sources = sources

    def train_chars(self) -> dict[str, int]:
        """Characters of training text per domain."""
        return {d: sum(len(t) for t in docs) for d, docs in self.train.items()}

    def iter_train_text(self):
        """Yield every training document (all domains, ``DOMAINS`` order)."""
        for d in DOMAINS:
            yield from self.train[d]

    def write_eval_jsonl(self, path: Path) -> None:
        """Write the evaluation samples as JSONL (one ``{"id", "text", "domain"}`` per line)."""
        with open(path, "w", encoding="utf-8") as f:
            for s in self.eval_samples:
                f.write(json.dumps({"id": s["id"], "text": s["text"], "domain": s["domain"]}, ensure_ascii=False))
                f.write("\n")


def build_corpus(
    seed: int,
    train_chars_per_domain: int,
    eval_samples_per_domain: int,
    eval_max_chars: int,
) -> Corpus:
    """Build the demo corpus.

    Parameters
    ----------
    seed : int
        Seeds file/topic shuffling, window positions and the generators.
    train_chars_per_domain : int
        Upper bound on training characters per domain (the prose domain has about
        200 k characters in total, so it may fall short; the trainer balances domains
        per batch regardless).
    eval_samples_per_domain : int
        Held-out samples per domain.
    eval_max_chars : int
        Maximum characters per held-out sample (cut at line or sentence boundaries).

    Returns
    -------
    Corpus

    Raises
    ------
    ValueError
        If a domain cannot provide enough held-out samples.
    """
    builders = {"code": _code_domain, "prose": _prose_domain, "math": _math_domain, "data": _data_domain}
    train: dict[str, list[str]] = {}
    train_src: dict[str, list[str]] = {}
    candidates: dict[str, list[tuple[str, str]]] = {}
    for domain in DOMAINS:
        rng = random.Random(f"moe-atlas-demo/{seed}/{domain}")
        train[domain], train_src[domain], candidates[domain] = builders[domain](
            rng, seed, train_chars_per_domain, eval_samples_per_domain, eval_max_chars
        )
    corpus = Corpus(train=train, eval_samples=[], train_sources=train_src, candidates=candidates)
    corpus.select_eval(eval_samples_per_domain)
    return corpus


# ---------------------------------------------------------------------------------------
# helpers


def _fitting(items: list[str], start: int, max_chars: int, *, sep: int) -> list[str]:
    """The consecutive ``items`` from ``start`` that fit in ``max_chars``, ``sep`` characters between two."""
    out: list[str] = []
    size = 0
    for item in items[start:]:
        add = len(item) + (sep if out else 0)
        if size + add > max_chars:
            break
        out.append(item)
        size += add
    return out


def _window_lines(text: str, start_line: int, max_chars: int) -> str:
    """Consecutive whole lines from ``start_line`` totalling at most ``max_chars``."""
    lines = text.split("\n")
    out = _fitting(lines, start_line, max_chars, sep=1)
    if not out and start_line < len(lines):
        # A single over-long line: cut it rather than return nothing.
        out = [lines[start_line][:max_chars]]
    return "\n".join(out).strip("\n")


def _take(sources: list[str], budget: int, make: Callable[[str, int], str]) -> tuple[list[str], list[str]]:
    """``make(source, room)`` for ``sources`` in order until ``budget`` characters are taken (``room``: what
    is left of it); the documents and their sources, an empty document skipped."""
    docs: list[str] = []
    taken: list[str] = []
    size = 0
    for source in sources:
        if size >= budget:
            break
        doc = make(source, budget - size)
        if doc:
            docs.append(doc)
            taken.append(source)
            size += len(doc)
    return docs, taken


def _fill(rng: random.Random, make, budget: int) -> list[str]:
    """Call ``make(rng)`` until ``budget`` characters are produced."""
    docs: list[str] = []
    size = 0
    while size < budget:
        doc = make(rng)
        docs.append(doc)
        size += len(doc)
    return docs


# ---------------------------------------------------------------------------------------
# code


def _stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} (sysconfig stdlib path) does not exist")
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    if len(rels) < 50:
        raise FileNotFoundError(f"standard library at {root} has only {len(rels)} .py files; expected hundreds")
    return root, rels


def _read_source(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    # Tabs and form feeds are kept; stray carriage returns are not.
    return text.replace("\r\n", "\n")


def _code_domain(rng: random.Random, seed: int, budget: int, n_eval: int, max_chars: int):
    root, rels = _stdlib_files()
    rng.shuffle(rels)
    # Held-out files come first in the shuffled order; more than needed, because some
    # candidates are rejected (too short, or found verbatim in training text).
    n_eval_files = min(len(rels) // 2, max(len(rels) // 10, 2 * n_eval + 8))
    eval_files, train_files = rels[:n_eval_files], rels[n_eval_files:]

    def train_doc(rel: str, room: int) -> str:
        text = _read_source(root / rel)
        if not text or len(text) < 200:
            return ""
        n_lines = text.count("\n") + 1
        start = rng.randrange(max(1, n_lines - 40)) if len(text) > _CODE_WINDOW_CHARS else 0
        return _window_lines(text, start, min(_CODE_WINDOW_CHARS, room + 200))

    docs, tsrc = _take(train_files, budget, train_doc)

    candidates: list[tuple[str, str]] = []
    for rel in eval_files:
        text = _read_source(root / rel)
        if not text or len(text) < 2 * max_chars:
            continue
        n_lines = text.count("\n") + 1
        for _ in range(5):
            window = _window_lines(text, rng.randrange(max(1, n_lines - 20)), max_chars)
            # Blank-ish windows (long runs of empty lines) make poor samples.
            if len(window) >= max_chars // 2:
                candidates.append((rel, window))
                break
    return docs, tsrc, candidates


# ---------------------------------------------------------------------------------------
# prose

_UNDERLINE = re.compile(r"[*=\-~^#]{3,}")


def _clean_topic(text: str) -> list[str]:
    """Paragraphs of running English text: indented blocks (code, grammar, tables) and headings removed."""
    paras = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
            continue
        if len(lines) >= 2 and _UNDERLINE.fullmatch(lines[-1].strip()):
            continue
        joined = " ".join(ln.strip() for ln in lines)
        # Headings without underline and list stubs are too short to be prose.
        if len(joined) >= 40:
            paras.append(joined)
    return paras


def _prose_window(paras: list[str], start: int, max_chars: int) -> str:
    out = _fitting(paras, start, max_chars, sep=2)
    if not out and start < len(paras):
        # One long paragraph: cut at the last sentence end that fits.
        p = paras[start][:max_chars]
        cut = p.rfind(". ")
        out = [p[: cut + 1] if cut > max_chars // 3 else p]
    return "\n\n".join(out)


def _prose_domain(rng: random.Random, seed: int, budget: int, n_eval: int, max_chars: int):
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - part of every CPython
        raise FileNotFoundError("pydoc_data.topics (Python documentation topics) is not importable") from exc
    cleaned = {n: _clean_topic(t) for n, t in topics.items()}
    names = sorted(n for n in cleaned if sum(len(p) for p in cleaned[n]) >= 200)
    rng.shuffle(names)
    # Up to two samples per held-out topic so that evaluation covers many topics; a few
    # spare topics absorb rejected candidates. At most a third of the topics is held out.
    n_eval_topics = min(len(names) // 3, (n_eval + 1) // 2 + 4)
    eval_topics, train_topics = names[:n_eval_topics], names[n_eval_topics:]

    # First windows of every held-out topic come before second windows, so that the
    # picks spread over topics before any topic contributes twice.
    # Some topics share paragraphs (e.g. the sequence-type pages): those stay out of
    # held-out windows, so evaluation prose is unseen paragraph by paragraph.
    train_paras = {p for name in train_topics for p in cleaned[name]}
    rounds: list[list[tuple[str, str]]] = [[], []]
    for name in eval_topics:
        paras = [p for p in cleaned[name] if p not in train_paras]
        for r, start in enumerate(sorted({0, len(paras) // 2})):
            window = _prose_window(paras, start, max_chars)
            if len(window) >= min(150, max_chars // 2):
                rounds[r].append((f"topic:{name}", window))
    candidates = rounds[0] + rounds[1]

    docs, tsrc = _take(train_topics, budget, lambda name, room: "\n\n".join(cleaned[name])[: room + 200])
    return docs, [f"topic:{name}" for name in tsrc], candidates


# ---------------------------------------------------------------------------------------
# math

_NAMES = [
    "Alice", "Bob", "Carmen", "Dmitri", "Esther", "Farid", "Grace", "Hiro", "Ines", "Jamal",
    "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq",
]
_ITEMS = [
    "apples", "books", "marbles", "stamps", "pencils", "coins", "cookies", "shells", "tickets",
    "cards", "bottles", "plants", "boxes", "eggs", "stickers",
]


# Problem kinds 0-2: "a op b = result", a and b drawn from these ranges.
_BINARY = {
    0: ((10, 1000), (10, 1000), "+", operator.add),
    1: ((100, 2000), (10, 100), "-", operator.sub),
    2: ((2, 100), (2, 50), "*", operator.mul),
}


def _math_problem(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind in _BINARY:
        a_range, b_range, sign, op = _BINARY[kind]
        a, b = rng.randrange(*a_range), rng.randrange(*b_range)
        return f"{a} {sign} {b} = {op(a, b)}"
    if kind == 3:
        b, q = rng.randrange(2, 30), rng.randrange(2, 60)
        return f"{b * q} / {b} = {q}"
    if kind == 4:
        a, x, c = rng.randrange(2, 12), rng.randrange(-20, 30), rng.randrange(-50, 50)
        sign = "+" if c >= 0 else "-"
        return f"Solve {a}x {sign} {abs(c)} = {a * x + c}. Answer: x = {x}"
    if kind == 5:
        n, m, p = rng.choice(_NAMES), rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randrange(3, 60), rng.randrange(2, 40)
        return (
            f"{n} has {a} {p}. {m} gives {n} {b} more. How many {p} does {n} have now? "
            f"{a} + {b} = {a + b}. The answer is {a + b}."
        )
    if kind == 6:
        n, p = rng.choice(_NAMES), rng.choice(_ITEMS)
        k, each = rng.randrange(2, 12), rng.randrange(2, 25)
        return (
            f"{n} buys {k} packs of {p} with {each} in each pack. How many {p} is that? "
            f"{k} * {each} = {k * each}. The answer is {k * each}."
        )
    a, b, c = rng.randrange(1, 20), rng.randrange(1, 20), rng.randrange(2, 9)
    return f"({a} + {b}) * {c} = {a + b} * {c} = {(a + b) * c}"


def _math_doc(rng: random.Random) -> str:
    return "\n".join(_math_problem(rng) for _ in range(rng.randrange(6, 20)))


def _generated_domain(name: str, make_doc: Callable[[random.Random], str], docs_per_sample: int,
                      rng: random.Random, seed: int, budget: int, n_eval: int, max_chars: int):
    """A domain whose documents ``make_doc`` generates: training documents from ``rng``, held-out
    candidates (``docs_per_sample`` documents, cut to ``max_chars``) from an independent stream, so
    that they are not a continuation of the training sequence of random draws."""
    docs = _fill(rng, make_doc, budget)
    erng = random.Random(f"moe-atlas-demo/{seed}/{name}/eval")
    candidates = [
        (f"stream:{name}/eval", _window_lines("\n".join(make_doc(erng) for _ in range(docs_per_sample)), 0, max_chars))
        for _ in range(2 * n_eval + 8)
    ]
    return docs, [f"stream:{name}/train"], candidates


def _math_domain(rng: random.Random, seed: int, budget: int, n_eval: int, max_chars: int):
    return _generated_domain("math", _math_doc, 3, rng, seed, budget, n_eval, max_chars)


# ---------------------------------------------------------------------------------------
# data

_CITIES = [
    "Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Perth", "Dakar", "Hanoi", "Oslo", "Lima",
    "Cork", "Tunis", "Bergen", "Austin", "Porto", "Kyoto", "Accra", "Cusco", "Graz", "Leeds",
]
_PRODUCTS = ["widget", "gadget", "sprocket", "bracket", "valve", "sensor", "cable", "filter", "pump", "relay"]
_LEVELS = ["INFO", "INFO", "INFO", "DEBUG", "WARNING", "ERROR"]
_SERVICES = ["api", "worker", "scheduler", "auth", "db", "cache", "gateway"]
_EVENTS = [
    "request handled", "connection opened", "connection closed", "job queued", "job finished",
    "cache miss", "retrying", "token refreshed", "timeout", "checkpoint saved",
]


def _date(rng: random.Random) -> str:
    return f"20{rng.randrange(18, 26)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"


def _json_record(rng: random.Random) -> str:
    rec = {
        "id": rng.randrange(1000, 99999),
        "name": f"{rng.choice(_NAMES)} {rng.choice(_NAMES)}son",
        "city": rng.choice(_CITIES),
        "active": rng.random() < 0.7,
        "score": round(rng.uniform(0, 100), 2),
        "tags": rng.sample(_PRODUCTS, rng.randrange(0, 4)),
        "joined": _date(rng),
    }
    if rng.random() < 0.4:
        rec["address"] = {"street": f"{rng.randrange(1, 300)} {rng.choice(_CITIES)} Road", "zip": f"{rng.randrange(10000, 99999)}"}
    return json.dumps(rec, indent=rng.choice([None, 2]))


def _csv_table(rng: random.Random) -> str:
    rows = ["order_id,date,product,quantity,unit_price,city"]
    for _ in range(rng.randrange(4, 14)):
        rows.append(
            f"{rng.randrange(10000, 99999)},{_date(rng)},{rng.choice(_PRODUCTS)},"
            f"{rng.randrange(1, 50)},{rng.uniform(0.5, 250):.2f},{rng.choice(_CITIES)}"
        )
    return "\n".join(rows)


def _ini_config(rng: random.Random) -> str:
    out = []
    for svc in rng.sample(_SERVICES, rng.randrange(2, 4)):
        out.append(f"[{svc}]")
        out.append(f"host = {svc}.{rng.choice(_CITIES).lower()}.internal")
        out.append(f"port = {rng.randrange(1024, 65535)}")
        out.append(f"workers = {rng.randrange(1, 33)}")
        out.append(f"timeout_s = {rng.choice([5, 10, 30, 60, 120])}")
        out.append(f"enabled = {rng.choice(['true', 'false'])}")
        out.append("")
    return "\n".join(out).strip()


def _log_lines(rng: random.Random) -> str:
    out = []
    h, m, s = rng.randrange(24), rng.randrange(60), rng.randrange(60)
    day = _date(rng)
    for _ in range(rng.randrange(4, 12)):
        s += rng.randrange(0, 20)
        m, s = m + s // 60, s % 60
        h, m = (h + m // 60) % 24, m % 60
        out.append(
            f"{day}T{h:02d}:{m:02d}:{s:02d}Z {rng.choice(_LEVELS)} {rng.choice(_SERVICES)}: "
            f"{rng.choice(_EVENTS)} id={rng.randrange(1, 10**6)} ms={rng.randrange(1, 5000)}"
        )
    return "\n".join(out)


def _data_doc(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return "\n".join(_json_record(rng) for _ in range(rng.randrange(2, 6)))
    return (_csv_table, _ini_config, _log_lines)[kind - 1](rng)


def _data_domain(rng: random.Random, seed: int, budget: int, n_eval: int, max_chars: int):
    return _generated_domain("data", _data_doc, 2, rng, seed, budget, n_eval, max_chars)
