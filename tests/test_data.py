"""Data: the passkey task, packing (exact against plain transformers), file formats, the loader."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model_config
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from longtune.trainer.config import ConfigError, DataConfig
from longtune.trainer.data import (
    IGNORE_INDEX,
    Batch,
    DataLoader,
    PackedDocuments,
    PasskeyTask,
    build_source,
    check_data_config,
    passkey_accuracy,
    read_documents,
    tokenize_documents,
)

PAD = 0  # pad id for synthetic documents; no synthetic document uses it


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    fields = tiny_model_config()
    fields.pop("model_type")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa"))
    return model.float().eval()


def synthetic_docs(lengths: list[int]) -> list[list[int]]:
    """Document k is [1000k+1, 1000k+2, ...]: every token says which document it came from."""
    return [[1000 * (k + 1) + j for j in range(n)] for k, n in enumerate(lengths)]


# --- passkey -------------------------------------------------------------------------------


def _answer_mask(sample) -> torch.Tensor:
    return sample.labels != IGNORE_INDEX


@pytest.mark.parametrize("digits,seq_len", [(5, 128), (3, 256), (8, 160)])
def test_passkey_sample_layout(tok, digits, seq_len):
    task = PasskeyTask(tok, seq_len, digits=digits)
    for i in range(12):
        s = task[i]
        key, _ = task.key_and_depth(i)
        assert len(key) == digits and key.isdigit()
        for t in (s.input_ids, s.labels, s.position_ids):
            assert t.shape == (seq_len,) and t.dtype == torch.int64
        assert torch.equal(s.position_ids, torch.arange(seq_len))
        mask = _answer_mask(s)
        n = int(mask.sum())
        assert n >= digits  # at least one token per digit is plausible; zero would mean no loss at all
        # the answer is the tail of the sample, and its labels are its own tokens
        assert mask[-n:].all() and not mask[:-n].any()
        assert torch.equal(s.labels[mask], s.input_ids[mask])
        assert tok.decode(s.labels[mask]).strip() == key
        # the needle precedes the question, and the key appears nowhere else
        text = tok.decode(s.input_ids)
        question = text.rindex("What is the pass key?")
        assert f"The pass key is {key}." in text[:question]
        assert text.count(key) == 3  # twice in the needle, once as the answer
        assert tok.decode(s.input_ids[~mask]).rstrip().endswith("The pass key is")


def test_passkey_is_deterministic_per_index_split_and_seed(tok):
    a, b = PasskeyTask(tok, 128, seed=3), PasskeyTask(tok, 128, seed=3)
    for i in (0, 1, 7, 1000):
        assert torch.equal(a[i].input_ids, b[i].input_ids)
        assert torch.equal(a[i].labels, b[i].labels)
    # reading out of order gives the same samples (no hidden generator state)
    assert torch.equal(a[7].input_ids, PasskeyTask(tok, 128, seed=3)[7].input_ids)
    others = {
        "index": a[1],
        "split": PasskeyTask(tok, 128, seed=3, split="eval")[0],
        "seed": PasskeyTask(tok, 128, seed=4)[0],
    }
    for what, other in others.items():
        assert not torch.equal(a[0].input_ids, other.input_ids), f"sample 0 equals the one with another {what}"
    keys = {a.key_and_depth(i)[0] for i in range(20)}
    assert len(keys) >= 18  # 5-digit keys: repeats are rare


def test_passkey_depth_varies(tok):
    task = PasskeyTask(tok, 256)
    where = []
    for i in range(40):
        key, _ = task.key_and_depth(i)
        text = tok.decode(task[i].input_ids)
        where.append(text.index(f"The pass key is {key}.") / len(text))
    assert len({round(w, 3) for w in where}) >= 30
    assert min(where) < 0.3 and max(where) > 0.6, where


def test_passkey_too_short_names_the_minimum(tok):
    with pytest.raises(ConfigError, match=r"seq_len=16 .*at least \d+") as info:
        PasskeyTask(tok, 16)
    minimum = int(re.search(r"at least (\d+)", str(info.value)).group(1))
    assert 16 < minimum < 128
    with pytest.raises(ConfigError, match=f"at least {minimum}"):
        PasskeyTask(tok, minimum - 1)
    task = PasskeyTask(tok, minimum)  # the stated minimum really is enough
    for i in range(5):
        s = task[i]
        assert s.input_ids.shape == (minimum,)
        assert tok.decode(s.labels[_answer_mask(s)]).strip() == task.key_and_depth(i)[0]
    with pytest.raises(ConfigError, match="at least"):
        build_source(DataConfig(kind="passkey", seq_len=16), tok, seed=0)


def test_build_source_passkey(tok):
    cfg = DataConfig(kind="passkey", seq_len=128, passkey={"digits": 7})
    src = build_source(cfg, tok, seed=5, split="eval")
    assert isinstance(src, PasskeyTask) and len(src) == 0
    ref = PasskeyTask(tok, 128, digits=7, seed=5, split="eval")
    assert torch.equal(src[3].input_ids, ref[3].input_ids)
    assert len(src.key_and_depth(0)[0]) == 7


# --- passkey_accuracy ----------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """A 'model' that reads the next token off its input: logits[t] peaks at input_ids[t + shift]."""

    def __init__(self, vocab: int, shift: int = 1, wrong_last: bool = False):
        super().__init__()
        self.vocab, self.shift, self.wrong_last = vocab, shift, wrong_last
        self.dummy = torch.nn.Linear(1, 1)

    def forward(self, input_ids, use_cache=None, logits_to_keep=0):
        target = torch.roll(input_ids, -self.shift, dims=1)
        if self.wrong_last:
            target[:, -2] = (target[:, -2] + 1) % self.vocab  # predicts the last token wrongly
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep  # as transformers
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target[:, keep], self.vocab).float() * 30)


def test_passkey_accuracy_on_tiny_model(tok):
    task = PasskeyTask(tok, 128, digits=4, split="eval")
    model = tiny_llama()
    model.train()
    out = passkey_accuracy(model, task, 3, torch.device("cpu"))
    assert set(out) == {"passkey_acc", "passkey_loss"}
    assert 0.0 <= out["passkey_acc"] <= 1.0
    assert torch.isfinite(torch.tensor(out["passkey_loss"])) and out["passkey_loss"] > 0
    assert model.training and all(m.training for m in model.modules())  # mode restored
    model.eval()
    passkey_accuracy(model, task, 1, torch.device("cpu"))
    assert not model.training and not any(m.training for m in model.modules())
    # the loss is transformers' own (shifted) loss on the answer labels
    s = task[0]
    with torch.no_grad():
        ref = model(input_ids=s.input_ids[None], labels=s.labels[None]).loss
    one = passkey_accuracy(model, task, 1, torch.device("cpu"))
    assert one["passkey_loss"] == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("kernels", [False, True], ids=["plain", "kernels"])
def test_passkey_accuracy_sends_only_the_answer_positions_through_the_head(tok, kernels):
    """The logits of the whole sequence would be the largest tensor of a long-context step (Llama-3-8B at 128K:
    34 GB in bf16, and an fp32 copy): the LM head sees only the positions that predict the answer."""
    from longtune.models.patch import apply_kernels

    task = PasskeyTask(tok, 128, digits=4, split="eval")
    model = tiny_llama()
    if kernels:
        apply_kernels(model, rmsnorm=False, rope=False, swiglu=False)  # the fused loss replaces the forward
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape[:-1].numel()))
    plain = passkey_accuracy(model, task, 2, torch.device("cpu"))
    assert rows == [int((task[i].labels != IGNORE_INDEX).sum()) for i in range(2)]  # the key's tokens, not 128
    s = task[0]  # the same loss as transformers' own over the whole sequence
    with torch.no_grad():
        ref = model(input_ids=s.input_ids[None], labels=s.labels[None]).loss
    assert passkey_accuracy(model, task, 1, torch.device("cpu"))["passkey_loss"] == pytest.approx(float(ref), rel=1e-5)
    assert plain["passkey_loss"] > 0


def test_passkey_accuracy_counts_exact_matches(tok):
    task = PasskeyTask(tok, 128, digits=5)
    vocab = len(tok)
    cpu = torch.device("cpu")
    perfect = passkey_accuracy(Oracle(vocab), task, 4, cpu)
    assert perfect["passkey_acc"] == 1.0 and perfect["passkey_loss"] < 1e-6
    # predicting the current token instead of the next one: off by one, never right
    assert passkey_accuracy(Oracle(vocab, shift=0), task, 4, cpu)["passkey_acc"] == 0.0
    # one wrong digit fails the whole key
    wrong_last = passkey_accuracy(Oracle(vocab, wrong_last=True), task, 4, cpu)
    assert wrong_last["passkey_acc"] == 0.0 and wrong_last["passkey_loss"] > 1.0


# --- packing -------------------------------------------------------------------------------


def reference_rows(docs: list[list[int]], seq_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Packing spelled out token by token: a piece of a document starts at a document start or a row start."""
    flat = [(tok_id, k, j) for k, doc in enumerate(docs) for j, tok_id in enumerate(doc)]
    rows = []
    for start in range(0, len(flat), seq_len):
        ids, labels, pos = [], [], []
        for f, (tok_id, k, j) in enumerate(flat[start : start + seq_len]):
            p = j if j <= f else f  # offset inside the document, restarted at the row start
            ids.append(tok_id)
            pos.append(p)
            labels.append(IGNORE_INDEX if p == 0 else tok_id)
        rows.append((ids, labels, pos))
    return rows


@pytest.mark.parametrize(
    "lengths,seq_len",
    [([5, 17, 40, 3, 64, 9], 32), ([7, 19, 12], 64), ([32, 32], 32), ([1, 1, 2, 100], 64), ([200], 64)],
)
def test_packing_rows(lengths, seq_len):
    docs = synthetic_docs(lengths)
    packed = PackedDocuments(docs, seq_len, PAD)
    total = sum(lengths)
    assert len(packed) == -(-total // seq_len)
    rows = [packed[i] for i in range(len(packed))]
    for s in rows:
        for t in (s.input_ids, s.labels, s.position_ids):
            assert t.shape == (seq_len,) and t.dtype == torch.int64
    # no token lost, none duplicated, order kept
    all_ids = torch.cat([s.input_ids for s in rows])
    assert all_ids[:total].tolist() == [t for d in docs for t in d]
    assert (all_ids[total:] == PAD).all()
    # the last row's padding carries no loss
    pad = len(rows) * seq_len - total
    if pad:
        assert (rows[-1].labels[-pad:] == IGNORE_INDEX).all()
        assert rows[-1].position_ids[seq_len - pad] == 0  # padding is not a continuation of the last document
    # positions restart at every document; the first token of a document has no label; others label themselves
    for s, (ids, labels, pos) in zip(rows, reference_rows(docs, seq_len)):
        n = len(ids)
        assert s.input_ids[:n].tolist() == ids
        assert s.position_ids[:n].tolist() == pos
        assert s.labels[:n].tolist() == labels
    # the same, stated directly: every document start is position 0 with no label
    flat_pos = torch.cat([s.position_ids for s in rows])
    flat_labels = torch.cat([s.labels for s in rows])
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    assert all(flat_pos[i] == 0 and flat_labels[i] == IGNORE_INDEX for i in starts)
    inside = [i for i in range(total) if i not in starts and i % seq_len != 0]
    assert all(flat_labels[i] == all_ids[i] and flat_pos[i] == flat_pos[i - 1] + 1 for i in inside)


def test_packing_off_is_one_row_per_document():
    docs = synthetic_docs([5, 64, 100, 1])
    packed = PackedDocuments(docs, 64, PAD, packing=False)
    assert len(packed) == len(docs)
    for doc, s in zip(docs, (packed[i] for i in range(len(packed)))):
        n = min(len(doc), 64)
        assert s.input_ids.shape == s.labels.shape == s.position_ids.shape == (64,)
        assert s.input_ids[:n].tolist() == doc[:n]  # truncated to seq_len
        assert (s.input_ids[n:] == PAD).all()
        assert s.labels[:n].tolist() == [IGNORE_INDEX] + doc[1:n]
        assert (s.labels[n:] == IGNORE_INDEX).all()
        assert s.position_ids[:n].tolist() == list(range(n))


def test_tokenize_documents_appends_eos_and_skips_empty(tok):
    docs = ["Hello world.", "", "Second document, longer than the first one."]
    out = tokenize_documents(tok, docs)
    assert len(out) == 2
    for text, ids in zip([docs[0], docs[2]], out):
        assert ids[-1] == tok.eos_token_id
        assert ids[:-1] == tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids[:-1]) == text


def test_loss_tokens_counts_shifted_labels():
    labels = torch.tensor([[5, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX]])
    batch = Batch(torch.zeros_like(labels), labels, torch.zeros_like(labels))
    assert batch.loss_tokens == 3  # column 0 is never a target, even when labelled
    assert isinstance(batch.loss_tokens, int)
    lengths = [7, 19, 12, 30]  # 68 tokens into rows of 32: the 12- and 30-token documents are split
    packed = PackedDocuments(synthetic_docs(lengths), 32, PAD)
    rows = [packed[i] for i in range(len(packed))]
    batch = Batch(*(torch.stack([getattr(s, f) for s in rows]) for f in ("input_ids", "labels", "position_ids")))
    pieces = len(lengths) + 2  # each split adds a piece whose first token has no label
    assert batch.loss_tokens == sum(lengths) - pieces


# --- packing is exact against plain transformers ------------------------------------------


def _doc_alone(model, doc: list[int]):
    ids = torch.tensor([doc])
    labels = torch.tensor([[IGNORE_INDEX] + doc[1:]])
    out = model(input_ids=ids, labels=labels, num_items_in_batch=1)  # num_items=1: the summed loss
    return out.logits[0], out.loss


def _check_packed_batch_exact(model, batch: Batch, pieces: list[tuple[int, int, int]], docs: list[list[int]]):
    """pieces: (row, start, doc index) of every document in the batch, each whole inside its row."""
    n = batch.loss_tokens
    # use_cache=False: transformers builds the block-diagonal mask from position_ids only without a KV cache
    out = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels,
        num_items_in_batch=n, use_cache=False,
    )
    loss_sum = torch.zeros(())
    for row, start, k in pieces:
        logits, loss = _doc_alone(model, docs[k])
        packed = out.logits[row, start : start + len(docs[k])]
        torch.testing.assert_close(packed, logits, atol=1e-5, rtol=1e-5, msg=f"document {k} logits differ")
        loss_sum += loss
    torch.testing.assert_close(out.loss * n, loss_sum, atol=1e-4, rtol=1e-5)
    assert n == sum(len(docs[k]) - 1 for _, _, k in pieces)
    return out


@torch.no_grad()
def test_packing_is_exact_against_documents_alone():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (7, 19, 12)]
    packed = PackedDocuments(docs, 64, PAD)
    assert len(packed) == 1
    s = packed[0]
    batch = Batch(s.input_ids[None], s.labels[None], s.position_ids[None])
    out = _check_packed_batch_exact(model, batch, [(0, 0, 0), (0, 7, 1), (0, 26, 2)], docs)

    # The comparison has teeth: without restarted positions the later documents see the earlier ones...
    plain = model(input_ids=batch.input_ids, use_cache=False).logits[0]
    torch.testing.assert_close(plain[:7], out.logits[0, :7], atol=1e-5, rtol=1e-5)  # first document: same
    assert (plain[7:38] - out.logits[0, 7:38]).abs().max() > 1e-4
    # ...and labels without the boundary IGNORE would add a cross-document target
    leaky = batch.input_ids.clone()
    n_leaky = int((leaky[:, 1:38] >= 0).sum())
    leaky[:, 38:] = IGNORE_INDEX
    leaky_loss = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, labels=leaky, num_items_in_batch=n_leaky,
        use_cache=False,
    ).loss * n_leaky
    assert n_leaky == batch.loss_tokens + 2
    assert abs(float(leaky_loss) - float(out.loss * batch.loss_tokens)) > 1.0


@torch.no_grad()
def test_packing_is_exact_for_a_micro_batch_of_two_rows():
    model = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(2)
    lengths = [10, 30, 24, 5, 20, 39]  # rows of 64: [10, 30, 24] and [5, 20, 39]
    docs = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]
    packed = PackedDocuments(docs, 64, PAD)
    assert len(packed) == 2
    batch = Batch(*(torch.stack([getattr(packed[i], f) for i in range(2)]) for f in ("input_ids", "labels", "position_ids")))
    pieces = [(0, 0, 0), (0, 10, 1), (0, 40, 2), (1, 0, 3), (1, 5, 4), (1, 25, 5)]
    _check_packed_batch_exact(model, batch, pieces, docs)


@torch.no_grad()
def test_packing_is_exact_as_the_trainer_calls_the_model(tokenizer_dir):
    from longtune.trainer.config import ModelConfig
    from longtune.trainer.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(config=tiny_model_config(), tokenizer=str(tokenizer_dir)))
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (7, 19, 12)]
    s = PackedDocuments(docs, 64, PAD)[0]
    batch = Batch(s.input_ids[None], s.labels[None], s.position_ids[None])
    n = batch.loss_tokens
    # build_model turns the KV cache off, so even a call without use_cache=False keeps documents apart
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels, num_items_in_batch=n)
    start = 0
    for doc in docs:
        alone = model(input_ids=torch.tensor([doc])).logits[0]
        torch.testing.assert_close(out.logits[0, start : start + len(doc)], alone, atol=1e-5, rtol=1e-5)
        start += len(doc)


# --- documents on disk ---------------------------------------------------------------------

DOCS = ["First document.", "Second one, with a comma.", "Third: ünïcödé ✓", "Fourth\nhas two lines."]


def test_read_jsonl_custom_field(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"id": i, "body": d, "text": "not this"}) for i, d in enumerate(DOCS)]
    lines.insert(2, "   ")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n")
    assert read_documents(DataConfig(kind="jsonl", path=str(path), text_field="body")) == DOCS
    # a folder of .jsonl/.json files, read in sorted order
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.jsonl").write_text(json.dumps({"body": DOCS[1]}) + "\n" + json.dumps({"body": DOCS[2]}) + "\n")
    (folder / "a.json").write_text(json.dumps({"body": DOCS[0]}) + "\n")
    (folder / "sub" / "c.jsonl").write_text(json.dumps({"body": DOCS[3]}))
    (folder / "notes.txt").write_text("ignored")
    assert read_documents(DataConfig(kind="jsonl", path=str(folder), text_field="body")) == DOCS


def test_read_text_folder(tmp_path):
    (tmp_path / "z").mkdir()
    (tmp_path / "00.txt").write_text(DOCS[0])
    (tmp_path / "01.md").write_text(DOCS[1])
    (tmp_path / "02.txt").write_text(DOCS[2])
    (tmp_path / "z" / "03.txt").write_text(DOCS[3])
    (tmp_path / "skip.csv").write_text("a,b")
    assert read_documents(DataConfig(kind="text", path=str(tmp_path))) == DOCS
    assert read_documents(DataConfig(kind="text", path=str(tmp_path / "02.txt"))) == [DOCS[2]]


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n": list(range(3)), "content": DOCS[:3]}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"n": [3], "content": DOCS[3:]}), tmp_path / "part-1.parquet")
    cfg = DataConfig(kind="parquet", path=str(tmp_path), text_field="content")
    assert read_documents(cfg) == DOCS
    cfg = DataConfig(kind="parquet", path=str(tmp_path / "part-0.parquet"), text_field="body")
    with pytest.raises(ConfigError, match=r"column 'body' not in .*part-0\.parquet.*content"):
        read_documents(cfg)


def test_read_hf_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"n": list(range(4)), "text": DOCS}).save_to_disk(str(tmp_path / "ds"))
    assert read_documents(DataConfig(kind="hf_disk", path=str(tmp_path / "ds"))) == DOCS
    with pytest.raises(ConfigError, match=r"column 'body' not in"):
        read_documents(DataConfig(kind="hf_disk", path=str(tmp_path / "ds"), text_field="body"))
    # a DatasetDict: the train split
    datasets.DatasetDict(
        {"validation": datasets.Dataset.from_dict({"text": ["no"]}), "train": datasets.Dataset.from_dict({"text": DOCS})}
    ).save_to_disk(str(tmp_path / "dd"))
    assert read_documents(DataConfig(kind="hf_disk", path=str(tmp_path / "dd"))) == DOCS
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a datasets save_to_disk folder"):
        read_documents(DataConfig(kind="hf_disk", path=str(tmp_path / "plain")))


def test_read_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n\n{not json\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}:3 is not valid JSON")):
        read_documents(DataConfig(kind="jsonl", path=str(bad)))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{missing}:2 has no field 'text'")):
        read_documents(DataConfig(kind="jsonl", path=str(missing)))
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('["text"]\n')
    with pytest.raises(ConfigError, match=re.escape(f"{not_object}:1 is a JSON list, not an object with a 'text' field")):
        read_documents(DataConfig(kind="jsonl", path=str(not_object)))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    for kind, suffix in (("jsonl", ".jsonl"), ("text", ".txt"), ("parquet", ".parquet")):
        with pytest.raises(ConfigError, match=f"no .*{re.escape(suffix)}.* files under {re.escape(str(empty_dir))}"):
            read_documents(DataConfig(kind=kind, path=str(empty_dir)))
        with pytest.raises(ConfigError, match="files under"):
            check_data_config(DataConfig(kind=kind, path=str(empty_dir)))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no documents"):
        read_documents(DataConfig(kind="jsonl", path=str(blank)))
    for fn in (read_documents, check_data_config):
        with pytest.raises(ConfigError, match="does not exist"):
            fn(DataConfig(kind="jsonl", path=str(tmp_path / "nowhere.jsonl")))


def test_build_source_from_jsonl(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    src = build_source(DataConfig(kind="jsonl", path=str(path), seq_len=16), tok, seed=0)
    assert isinstance(src, PackedDocuments)
    tokens = [t for ids in tokenize_documents(tok, DOCS) for t in ids]
    assert len(src) == -(-len(tokens) // 16)
    flat = torch.cat([src[i].input_ids for i in range(len(src))]).tolist()
    assert flat[: len(tokens)] == tokens
    unpacked = build_source(DataConfig(kind="jsonl", path=str(path), seq_len=16, packing=False), tok, seed=0)
    assert len(unpacked) == len(DOCS)


def test_source_without_tokens_is_a_config_error(tmp_path, tok):
    path = tmp_path / "empty_texts.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ConfigError):
        src = build_source(DataConfig(kind="jsonl", path=str(path), seq_len=16), tok, seed=0)
        next(DataLoader(src, 1))


def test_null_text_is_not_the_string_none(tmp_path):
    path = tmp_path / "nulls.jsonl"
    path.write_text(json.dumps({"text": "real"}) + "\n" + json.dumps({"text": None}) + "\n")
    try:
        docs = read_documents(DataConfig(kind="jsonl", path=str(path)))
    except ConfigError:
        return  # rejecting it is fine too
    assert "None" not in docs


# --- the loader ----------------------------------------------------------------------------


def numbered_rows(n: int, seq_len: int = 8) -> PackedDocuments:
    """n rows; every token of row r is 1000 + r."""
    return PackedDocuments([[1000 + r] * seq_len for r in range(n)], seq_len, PAD)


def items(batches: list[Batch]) -> list[int]:
    return [int(row[0]) - 1000 for b in batches for row in b.input_ids]


def take(loader: DataLoader, n: int) -> list[Batch]:
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("micro_batch_size", [1, 2, 3])
def test_loader_epochs_are_seeded_permutations(micro_batch_size):
    n, epochs = 7, 4
    src = numbered_rows(n)
    loader = DataLoader(src, micro_batch_size, seed=0)
    batches = take(loader, n * epochs // micro_batch_size)
    for b in batches:
        assert b.input_ids.shape == b.labels.shape == b.position_ids.shape == (micro_batch_size, 8)
    seen = items(batches)
    orders = [seen[e * n : (e + 1) * n] for e in range(len(seen) // n)]
    assert len(orders) >= 3
    for order in orders:
        assert sorted(order) == list(range(n))  # every item exactly once per epoch
    assert len({tuple(o) for o in orders}) == len(orders)  # a new permutation each epoch
    assert orders[0] != list(range(n))  # shuffled
    # the order is a function of the seed only, not of the micro-batch size
    again = items(take(DataLoader(src, 1, seed=0), len(seen)))
    assert again == seen
    other = items(take(DataLoader(src, 1, seed=1), len(seen)))
    assert other[:n] != seen[:n] and sorted(other[:n]) == list(range(n))


@pytest.mark.parametrize(
    "n_rows,resume_after",
    [
        (8, 1),  # mid epoch 0
        (8, 4),  # exactly at the end of epoch 0
        (8, 6),  # mid epoch 1
        (7, 3),  # the next batch straddles the epoch boundary
        (7, 7),  # exactly at the end of epoch 1 (14 items)
    ],
)
def test_loader_resume_is_exact_on_packed_documents(n_rows, resume_after):
    src = numbered_rows(n_rows)
    reference = take(DataLoader(src, 2, seed=11), resume_after + 6)
    first = DataLoader(src, 2, seed=11)
    assert items(take(first, resume_after)) == items(reference[:resume_after])
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert all(isinstance(v, int) for v in state.values())
    resumed = DataLoader(src, 2, seed=11)
    resumed.load_state_dict(state)
    for got, want in zip(take(resumed, 6), reference[resume_after:]):
        for f in ("input_ids", "labels", "position_ids"):
            assert torch.equal(getattr(got, f), getattr(want, f))
    # and the resumed loader goes on to the same position as the uninterrupted one
    uninterrupted = DataLoader(src, 2, seed=11)
    take(uninterrupted, resume_after + 6)
    assert items([next(resumed)]) == items([next(uninterrupted)])


def test_loader_resume_with_a_different_seed_is_not_the_same():
    # guards the test above: a resumed loader with the wrong seed must not match by accident
    src = numbered_rows(8)
    reference = take(DataLoader(src, 2, seed=11), 8)
    state = DataLoader(src, 2, seed=11).state_dict() | {"index": 2}
    wrong = DataLoader(src, 2, seed=12)
    wrong.load_state_dict(state)
    assert items(take(wrong, 3)) != items(reference[1:4])


@pytest.mark.parametrize("resume_after", [1, 3])
def test_loader_resume_is_exact_on_passkey(tok, resume_after):
    task = PasskeyTask(tok, 128, digits=4)
    reference = take(DataLoader(task, 2, seed=0), resume_after + 3)
    first = DataLoader(task, 2, seed=0)
    take(first, resume_after)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["index"] == 2 * resume_after
    resumed = DataLoader(PasskeyTask(tok, 128, digits=4), 2, seed=0)
    resumed.load_state_dict(state)
    for got, want in zip(take(resumed, 3), reference[resume_after:]):
        for f in ("input_ids", "labels", "position_ids"):
            assert torch.equal(getattr(got, f), getattr(want, f))
    # an endless source is read in index order: batch b holds samples 2b and 2b+1
    assert torch.equal(reference[1].input_ids[1], task[3].input_ids)
