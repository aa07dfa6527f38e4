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
from .inputs import _files, check_data_config, data_format, read_text  # noqa: F401 (check_data_config: re-exported)

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
    docs: list[str] = []
    if cfg.kind == "text":
        docs = [read_text(file) for file in _files(path, "text")]
    else:
        for where, record in read_records(path, cfg.kind, (field,), "data.text_field", repr(field)):
            if field not in record:
                raise ConfigError(f"data.text_field: {where} has no field {field!r}")
            if record[field] is not None:
                docs.append(_text(record[field], where, field))
    if not docs:
        raise ConfigError(f"data.path: {cfg.path} holds no documents")
    return docs


def read_records(path: Path, kind: str, columns: tuple[str, ...], key: str, wanted: str) -> Iterator[tuple[str, dict]]:
    """(where, record) of every record of a jsonl, parquet or hf_disk source at `path`, in order; `where` names the
    file and line (`file:3`) or row (`file row 2`). A JSONL record comes whole; a parquet file or a data set gives
    the `columns` it has, and must have one of them (`key`, `wanted`: the setting and the fields, for the error)."""
    if kind == "hf_disk":
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ConfigError(f"data.path: {path} is not a datasets save_to_disk folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        present = [c for c in columns if c in ds.column_names]
        if not present:
            raise ConfigError(f"{key}: column {wanted} not in {path} (columns: {ds.column_names})")
        for i, record in enumerate(ds.select_columns(present).to_list()):
            yield f"{path} row {i}", record
        return
    for file in _files(path, kind):
        if kind == "jsonl":
            for n, line in enumerate(read_text(file).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"data.path: {file}:{n} is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"data.path: {file}:{n} is a JSON {type(record).__name__}, not an object with a "
                                      f"{columns[0]!r} field")
                yield f"{file}:{n}", record
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(file)
                present = [c for c in columns if c in schema.names]
                if not present:
                    raise ConfigError(f"{key}: column {wanted} not in {file} (columns: {schema.names})")
                rows = pq.read_table(file, columns=present).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise ConfigError(f"data.path: {file} is not a readable parquet file ({_first_line(e)})") from None
            for i, record in enumerate(rows):
                yield f"{file} row {i}", record


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


# --- conversations -----------------------------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    where: str  # the file and line (or row) it was read from
    messages: list[dict]  # checked {role, content, ...} records
    pair: bool = False  # a prompt/completion record, as [user: prompt, assistant: completion]


def read_conversations(cfg: DataConfig) -> list[Conversation]:
    """The records of a data.kind=chat source, each checked: a bad one is a one-line error naming file and line."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError(f"data.path: {cfg.path} does not exist")
    c = cfg.chat
    wanted = f"{c.messages_field!r} (or {c.prompt_field!r} and {c.completion_field!r})"
    fields = (c.messages_field, c.prompt_field, c.completion_field)
    out = [_conversation(record, where, cfg) for where, record in
           read_records(path, data_format(cfg), fields, "data.chat.messages_field", wanted)]
    if not out:
        raise ConfigError(f"data.path: {cfg.path} holds no conversations")
    return out


def _conversation(record: dict, where: str, cfg: DataConfig) -> Conversation:
    c = cfg.chat
    field = c.messages_field
    messages, prompt, completion = (record.get(k) for k in (field, c.prompt_field, c.completion_field))
    if messages is None:
        if prompt is None and completion is None:
            raise ConfigError(f"data.chat.messages_field: {where} has no field {field!r} (nor {c.prompt_field!r} and "
                              f"{c.completion_field!r})")
        for setting, name, value, other in (("prompt_field", c.prompt_field, prompt, c.completion_field),
                                            ("completion_field", c.completion_field, completion, c.prompt_field)):
            if value is None:
                raise ConfigError(f"data.chat.{setting}: {where} has {other!r} but no {name!r}")
            if not isinstance(value, str):
                raise ConfigError(f"data.path: {where}: {name!r} holds a {type(value).__name__}, not text")
        return Conversation(where, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                            pair=True)
    if prompt is not None or completion is not None:
        raise ConfigError(f"data.path: {where} has both {field!r} and {c.prompt_field!r}/{c.completion_field!r}; "
                          "give one form per record")
    if not isinstance(messages, list):
        raise ConfigError(f"data.path: {where}: {field!r} holds a {type(messages).__name__}, not a list of "
                          "{role, content} messages")
    if not messages:
        raise ConfigError(f"data.path: {where}: {field!r} is an empty conversation")
    checked = []
    for j, m in enumerate(messages):
        what = f"data.path: {where}: {field}[{j}]"
        if not isinstance(m, dict):
            raise ConfigError(f"{what} is a {type(m).__name__}, not a {{role, content}} object")
        m = {k: v for k, v in m.items() if v is not None}  # parquet and datasets fill absent struct keys with null
        if "role" not in m:
            raise ConfigError(f"{what} has no 'role'")
        if m["role"] not in CHAT_ROLES:
            raise ConfigError(f"{what} has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
        if "content" not in m:
            raise ConfigError(f"{what} ({m['role']}) has no 'content'")
        if not isinstance(m["content"], str):
            raise ConfigError(f"{what} ({m['role']}): 'content' holds a {type(m['content']).__name__}, not text")
        checked.append(m)
    roles = [m["role"] for m in checked]
    if "assistant" not in roles:
        raise ConfigError(f"data.path: {where}: {field!r} has no assistant message, so nothing to learn")
    if roles[0] == "assistant":
        raise ConfigError(f"data.path: {where}: {field!r} starts with an assistant message; the template marks where "
                          "an answer begins only after a turn before it")
    return Conversation(where, checked)


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _render(tokenizer, messages: list[dict], generation: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # noqa: BLE001 -- a template's raise_exception (jinja), or transformers' ValueError
        raise ConfigError(f"data.path: {where}: the chat template of {_tokenizer_name(tokenizer)} refused the "
                          f"conversation: {_first_line(e)}") from None
    if not isinstance(text, str):
        raise ConfigError(f"data.kind=chat: the chat template of {_tokenizer_name(tokenizer)} rendered a "
                          f"{type(text).__name__}, not text")
    return text


def render_conversation(tokenizer, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the template renders it, and the character spans the assistant's messages add.

    The span of assistant message i runs from the end of messages[:i] rendered with the generation prompt (the
    template's header of an assistant turn) to the end of messages[:i+1]: the content and whatever the template
    closes the turn with (its end-of-turn token, which the model must learn to emit). Each render must be the
    start of the next and of the whole, or the spans would not be the whole's."""
    msgs = conv.messages
    full = _render(tokenizer, msgs, False, conv.where)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, msgs[:i], True, conv.where)
        after = full if i == len(msgs) - 1 else _render(tokenizer, msgs[:i + 1], False, conv.where)
        if not (after.startswith(before) and full.startswith(after)):
            raise ConfigError(f"data.kind=chat: the chat template of {_tokenizer_name(tokenizer)} does not render "
                              f"{conv.where} prefix by prefix (the text before message {i} changes as the "
                              "conversation goes on), so the assistant's tokens cannot be told apart")
        spans.append((len(before), len(after)))
    return full, spans


def _tokens_in_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """The text's tokens, and which of them start inside a span. A fast tokenizer reads the whole text (the ids
    are the ones the model sees at inference); a slow one, without offsets, reads span by span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        inside, k = [], 0
        for start, _ in enc["offset_mapping"]:
            while k < len(spans) and spans[k][1] <= start:
                k += 1
            inside.append(k < len(spans) and spans[k][0] <= start)
        return list(enc["input_ids"]), inside
    ids, inside, pos = [], [], 0
    for a, b in [*spans, (len(text), len(text))]:
        for piece, flag in ((text[pos:a], False), (text[a:b], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                inside += [flag] * len(piece_ids)
        pos = b
    return ids, inside


def tokenize_conversation(tokenizer, conv: Conversation) -> tuple[list[int], list[int]]:
    """ids, and labels: the id on every token of the assistant's turns, IGNORE_INDEX elsewhere (and on the first
    token, as every packed piece). Without a chat template a prompt/completion pair is the prompt's tokens, then
    the completion's and EOS, which carry the loss."""
    if getattr(tokenizer, "chat_template", None):
        text, spans = render_conversation(tokenizer, conv)
        ids, inside = _tokens_in_spans(tokenizer, text, spans)
        labels = [t if flag else IGNORE_INDEX for t, flag in zip(ids, inside)]
    elif conv.pair:
        prompt = tokenizer(conv.messages[0]["content"], add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        completion = tokenizer(conv.messages[1]["content"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    else:
        raise ConfigError(_no_template(tokenizer, conv))
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels


def _no_template(tokenizer, conv: Conversation) -> str:
    return (f"data.kind=chat: the tokenizer {_tokenizer_name(tokenizer)} has no chat template, so the conversation "
            f"at {conv.where} cannot be rendered; use a tokenizer that has one (model.tokenizer), or "
            "prompt/completion records")


class PackedConversations(PackedDocuments):
    """Tokenised conversations, whole, in `seq_len` rows: with packing as many as fit in a row, in order, else one
    per row. Every conversation starts at position 0 with no label on its first token, as packed documents do, so
    attention and loss stay inside it; rows are padded with ignored labels."""

    def __init__(self, convs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, packing: bool = True):
        self.seq_len = seq_len
        self.rows = []
        ids, labels, pos = [], [], []
        for conv_ids, conv_labels in convs:
            if len(conv_ids) > seq_len:
                raise ValueError(f"a conversation of {len(conv_ids)} tokens does not fit rows of {seq_len}")
            if ids and (not packing or len(ids) + len(conv_ids) > seq_len):
                self._pad_and_add(ids, labels, pos, pad_id)
                ids, labels, pos = [], [], []
            ids.extend(conv_ids)
            labels.extend([IGNORE_INDEX] + list(conv_labels[1:]))
            pos.extend(range(len(conv_ids)))
        if ids:
            self._pad_and_add(ids, labels, pos, pad_id)


def build_chat_source(cfg: DataConfig, tokenizer) -> PackedConversations:
    """data.kind=chat: read, render, tokenise, apply data.chat.too_long, pack; one line says what became of it."""
    convs = read_conversations(cfg)
    if not getattr(tokenizer, "chat_template", None):
        first = next((c for c in convs if not c.pair), None)
        if first is not None:  # before any tokenising: the first such record is the one to name
            raise ConfigError(_no_template(tokenizer, first))
    tokenized = [(c.where, *tokenize_conversation(tokenizer, c)) for c in convs]
    seq_len, policy = cfg.seq_len, cfg.chat.too_long
    long = [(where, len(ids)) for where, ids, _ in tokenized if len(ids) > seq_len]
    if long and policy == "error":
        raise ConfigError(f"data.chat.too_long=error: {len(long)} of {len(tokenized)} conversations are longer than "
                          f"data.seq_len={seq_len} tokens (the first: {long[0][0]}, {long[0][1]} tokens); set "
                          "data.chat.too_long=truncate (keep each one's first seq_len tokens) or drop, or raise "
                          "data.seq_len")
    kept, emptied = [], 0
    for _, ids, labels in tokenized:
        if len(ids) > seq_len:
            if policy == "drop":
                continue
            ids, labels = ids[:seq_len], labels[:seq_len]
            if all(label == IGNORE_INDEX for label in labels):
                emptied += 1  # truncated before the first answer: nothing left to learn
                continue
        kept.append((ids, labels))
    if not kept:
        raise ConfigError(f"data.path: {cfg.path}: no conversation is left to train on (data.chat.too_long={policy}, "
                          f"{len(long)} longer than data.seq_len={seq_len})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    source = PackedConversations(kept, seq_len, pad, cfg.packing)
    # What became of the conversations longer than seq_len (tests and callers read these; the line below says them).
    source.conversations, source.truncated = len(kept), (len(long) - emptied if policy == "truncate" else 0)
    source.dropped = len(long) if policy == "drop" else emptied
    tokens = sum(len(ids) for ids, _ in kept)
    loss = sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in kept)
    line = (f"data.kind=chat: {_count(len(kept), 'conversation')} from {cfg.path}, {tokens:,} tokens ({loss:,} of "
            f"them the assistant's, which carry the loss) in {_count(len(source), 'row')} of {seq_len}")
    if long and policy == "truncate":
        line += f"; {len(long)} longer than data.seq_len truncated to it"
        if emptied:
            line += f" ({emptied} of them dropped: no assistant token was left)"
    elif long:
        line += f"; {len(long)} longer than data.seq_len dropped"
    _print_once(line)
    return source


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _print_once(line: str) -> None:
    """On the main rank only: every rank builds the same source."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(line, flush=True)


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
    if cfg.kind == "chat":
        return build_chat_source(cfg, tokenizer)
    docs = tokenize_documents(tokenizer, read_documents(cfg))
    if not docs:
        raise ConfigError(f"data.path: {cfg.path} has no tokens after tokenization")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PackedDocuments(docs, cfg.seq_len, pad, cfg.packing)
