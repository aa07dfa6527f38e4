"""Long-sequence training data: the built-in passkey task and packed documents from disk.

Every source is indexable and deterministic, so the loader's position is two
integers (epoch, index) and resuming continues the exact sample order.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol

import numpy as np
import torch

from .config import ConfigError, DataConfig
from .inputs import _files, check_data_config, read_text  # noqa: F401 (check_data_config: re-exported)

IGNORE_INDEX = -100  # labels transformers' loss skips


@dataclass
class Sample:
    input_ids: torch.Tensor  # [seq_len] int64
    labels: torch.Tensor  # [seq_len]; IGNORE_INDEX where no loss is taken
    position_ids: torch.Tensor  # [seq_len]; restarts at 0 at every packed document


class Source(Protocol):
    def __len__(self) -> int: ...  # 0 means endless (generated on demand)
    def __getitem__(self, index: int) -> Sample: ...


# --- passkey retrieval -------------------------------------------------------------------

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


class PasskeyTask:
    """A random key buried at a random depth in filler text of exactly `seq_len` tokens.

    Loss is taken on the answer tokens only. Sample `i` of a split is a pure
    function of (seed, split, i), so no generator state needs saving.
    """

    def __init__(self, tokenizer, seq_len: int, digits: int = 5, seed: int = 0, split: str = "train"):
        self.tokenizer, self.seq_len, self.digits, self.seed, self.split = tokenizer, seq_len, digits, seed, split
        self.intro = self._ids(PASSKEY_INTRO)
        self.filler = self._ids(PASSKEY_FILLER)
        self.question = self._ids(PASSKEY_QUESTION)
        bos = tokenizer.bos_token_id
        self.prefix = ([bos] if bos is not None else []) + self.intro
        example = self._pieces("9" * digits)
        fixed = sum(len(p) for p in example)
        if fixed + len(self.filler) > seq_len:
            raise ConfigError(f"data.seq_len={seq_len} is too short for the passkey task; it needs at least {fixed + len(self.filler)} tokens")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pieces(self, key: str) -> tuple[list[int], list[int], list[int], list[int]]:
        needle = self._ids(f" The pass key is {key}. Remember it. {key} is the pass key.")
        return self.prefix, needle, self.question, self._ids(f" {key}")

    def __len__(self) -> int:
        return 0

    def key_and_depth(self, index: int) -> tuple[str, float]:
        rng = random.Random(f"passkey-{self.seed}-{self.split}-{index}")
        key = "".join(rng.choice("0123456789") for _ in range(self.digits))
        return key, rng.random()

    def __getitem__(self, index: int) -> Sample:
        key, depth = self.key_and_depth(index)
        prefix, needle, question, answer = self._pieces(key)
        budget = self.seq_len - len(prefix) - len(needle) - len(question) - len(answer)
        filler = (self.filler * math.ceil(budget / len(self.filler)))[:budget]
        cut = int(depth * budget)
        ids = prefix + filler[:cut] + needle + filler[cut:] + question + answer
        if len(ids) != self.seq_len:  # a key that tokenises longer than the one sized for
            raise ConfigError(f"data.seq_len={self.seq_len} is too short for passkey sample {index}")
        labels = [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
        return Sample(torch.tensor(ids), torch.tensor(labels), torch.arange(len(ids)))


@torch.no_grad()
def passkey_accuracy(model, task: PasskeyTask, n: int, device: torch.device, autocast=None) -> dict[str, float]:
    """Teacher-forced exact match of every answer digit, plus the answer loss. Only the positions that predict
    the answer go through the LM head (`logits_to_keep`): the whole sequence's logits would be the step's largest
    tensor (Llama-3-8B at 128K: 34 GB in bf16)."""
    was_training = model.training
    model.eval()
    correct, loss_sum, tokens = 0, 0.0, 0
    try:
        for i in range(n):
            sample = task[i]
            answer_pos = (sample.labels != IGNORE_INDEX).nonzero().squeeze(1)
            with autocast() if autocast else contextlib.nullcontext():
                out = model(input_ids=sample.input_ids[None].to(device), use_cache=False,
                            logits_to_keep=(answer_pos - 1).to(device))  # logits at t predict token t+1
            predicted = out.logits[0].float()
            target = sample.input_ids[answer_pos].to(device)
            correct += int(bool((predicted.argmax(-1) == target).all()))
            loss_sum += float(torch.nn.functional.cross_entropy(predicted, target, reduction="sum"))
            tokens += len(target)
    finally:
        model.train(was_training)
    return {"passkey_acc": correct / max(n, 1), "passkey_loss": loss_sum / max(tokens, 1)}


# --- documents from disk -----------------------------------------------------------------

def read_documents(cfg: DataConfig) -> list[str]:
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError(f"data.path: {cfg.path} does not exist")
    field = cfg.text_field
    if cfg.kind == "hf_disk":
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ConfigError(f"data.path: {path} is not a datasets save_to_disk folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if field not in ds.column_names:
            raise ConfigError(f"data.text_field: column {field!r} not in {ds.column_names}")
        return [_text(t, f"{path} row {i}", field) for i, t in enumerate(ds[field]) if t is not None]
    docs: list[str] = []
    for file in _files(path, cfg.kind):
        if cfg.kind == "text":
            docs.append(read_text(file))
        elif cfg.kind == "jsonl":
            for n, line in enumerate(read_text(file).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"data.path: {file}:{n} is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"data.path: {file}:{n} is a JSON {type(record).__name__}, not an object with a "
                                      f"{field!r} field")
                if field not in record:
                    raise ConfigError(f"data.text_field: {file}:{n} has no field {field!r}")
                if record[field] is not None:
                    docs.append(_text(record[field], f"{file}:{n}", field))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(file)
                if field not in schema.names:
                    raise ConfigError(f"data.text_field: column {field!r} not in {file} (columns: {schema.names})")
                values = pq.read_table(file, columns=[field]).column(field).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise ConfigError(f"data.path: {file} is not a readable parquet file ({_first_line(e)})") from None
            docs.extend(_text(t, f"{file} row {i}", field) for i, t in enumerate(values) if t is not None)
    if not docs:
        raise ConfigError(f"data.path: {cfg.path} holds no documents")
    return docs


def _text(value, where: str, field: str) -> str:
    """A document's text; a number, list or mapping in the text field is a mistake, not a document."""
    if not isinstance(value, str):
        raise ConfigError(f"data.text_field: {where}: {field!r} holds a {type(value).__name__}, not text")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class PackedDocuments:
    """Documents tokenised with EOS, concatenated, and cut into `seq_len` rows.

    position_ids restart at every document, so transformers keeps attention
    inside a document (flash-attention varlen, or the packed-sequence mask), and
    the first token of every document carries no label, so no loss crosses a
    boundary. The last row is padded (no labels on padding).
    """

    def __init__(self, docs: list[list[int]], seq_len: int, pad_id: int, packing: bool = True):
        self.seq_len = seq_len
        self.rows: list[tuple[list[int], list[int], list[int]]] = []
        if packing:
            self._pack(docs, pad_id)
        else:
            for doc in docs:
                ids, labels, pos = [], [], []
                self._append(ids, labels, pos, doc[:seq_len])
                self._pad_and_add(ids, labels, pos, pad_id)

    @staticmethod
    def _append(ids: list[int], labels: list[int], pos: list[int], doc: list[int]) -> None:
        ids.extend(doc)
        labels.extend([IGNORE_INDEX] + doc[1:])
        pos.extend(range(len(doc)))

    def _pack(self, docs: list[list[int]], pad_id: int) -> None:
        ids, labels, pos = [], [], []
        for doc in docs:
            while doc:
                room = self.seq_len - len(ids)
                self._append(ids, labels, pos, doc[:room])
                doc = doc[room:]
                if len(ids) == self.seq_len:
                    self.rows.append((ids, labels, pos))
                    ids, labels, pos = [], [], []
        if ids:
            self._pad_and_add(ids, labels, pos, pad_id)

    def _pad_and_add(self, ids, labels, pos, pad_id) -> None:
        pad = self.seq_len - len(ids)
        ids.extend([pad_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        pos.extend(range(pad))
        self.rows.append((ids, labels, pos))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        ids, labels, pos = self.rows[index]
        return Sample(torch.tensor(ids), torch.tensor(labels), torch.tensor(pos))


def tokenize_documents(tokenizer, docs: list[str]) -> list[list[int]]:
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [ids + ([eos] if eos is not None else []) for ids in encoded if ids]


# --- the loader ----------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [micro_batch, seq_len]
    labels: torch.Tensor
    position_ids: torch.Tensor
    # The target of each token, already shifted (sequence parallel: a shard's last token predicts the next
    # shard's first, so the shift is made on the whole sequence before it is cut). None: transformers shifts.
    shift_labels: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=True)
                       for t in (self.input_ids, self.labels, self.position_ids, self.shift_labels)))

    def shard(self, index: int, shards: int) -> "Batch":
        """Contiguous token shard `index` of `shards`, with its targets shifted on the whole sequence."""
        s = self.input_ids.shape[1] // shards
        cut = slice(index * s, (index + 1) * s)
        shifted = torch.nn.functional.pad(self.labels[:, 1:], (0, 1), value=IGNORE_INDEX)[:, cut].contiguous()
        return Batch(self.input_ids[:, cut].contiguous(), shifted, self.position_ids[:, cut].contiguous(), shifted)

    @property
    def loss_tokens(self) -> int:
        if self.shift_labels is not None:
            return int((self.shift_labels != IGNORE_INDEX).sum())
        # transformers shifts labels by one: label 0 is never a target.
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


class DataLoader:
    """Micro-batches in a seeded order; state_dict() is the exact position.

    With `world` ranks, each step of the order is cut into `world` micro-batches and rank r takes the r-th, so
    the ranks together see what one process with world times the batch would, and the position (the same on
    every rank) stays valid for any other world size."""

    def __init__(self, source: Source, micro_batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.source, self.micro_batch_size, self.seed = source, micro_batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0
        self._order: Optional[np.ndarray] = None

    def _position_to_item(self) -> int:
        if len(self.source) == 0:  # endless source: the index is the sample
            return self.index
        if self.index >= len(self.source):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.source))
        return int(self._order[self.index])

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        samples = []
        for r in range(self.world):
            for _ in range(self.micro_batch_size):
                item = self._position_to_item()
                if r == self.rank:  # the other ranks' samples are skipped, not built
                    samples.append(self.source[item])
                self.index += 1
        return Batch(*(torch.stack([getattr(s, f) for s in samples]) for f in ("input_ids", "labels", "position_ids")))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


def build_source(cfg: DataConfig, tokenizer, seed: int, split: str = "train") -> Source:
    if cfg.kind == "passkey":
        return PasskeyTask(tokenizer, cfg.seq_len, cfg.passkey.digits, seed, split)
    docs = tokenize_documents(tokenizer, read_documents(cfg))
    if not docs:
        raise ConfigError(f"data.path: {cfg.path} has no tokens after tokenization")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PackedDocuments(docs, cfg.seq_len, pad, cfg.packing)
