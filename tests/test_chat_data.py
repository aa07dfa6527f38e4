"""data.kind=chat: conversations rendered with SmolLM2's own chat template, the loss on the assistant's tokens only,
packed exactly, malformed records refused in one line, and a training run on chat data."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import read_metrics, run_cli, tiny_model_config
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from longtune.trainer.config import ConfigError, DataConfig, validate
from longtune.trainer.data import (
    IGNORE_INDEX,
    Conversation,
    PackedConversations,
    build_source,
    check_data_config,
    read_conversations,
    tokenize_conversation,
)

CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What colour is the sky? Say: The sky is blue."},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Grass is green, mostly."},
]
MORE = [  # conversations of different lengths and forms, for packing
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help you today?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "Times three?"}, {"role": "assistant", "content": "12"}],
    [{"role": "user", "content": "Name a prime number larger than ten."}, {"role": "assistant", "content": "Eleven."},
     {"role": "user", "content": "thanks"}],
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def plain_tok(tokenizer_dir):
    """The same tokenizer without a chat template."""
    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = None
    return t


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def find(seq: list[int], sub: list[int], start: int = 0) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise AssertionError(f"{sub} not in {seq[start:]}")


# --- labels on the assistant's tokens, with SmolLM2's own template -----------------------------


def test_smollm2_gguf_tokenizer_carries_its_chat_template(tok):
    # tokenizer_dir is the GGUF's tokenizer (model.build_tokenizer) saved once: the GGUF's tokenizer.chat_template
    # metadata comes through transformers' GGUF loader and survives save_pretrained (a run's tokenizer/ folder)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template and "add_generation_prompt" in tok.chat_template


def test_multi_turn_labels_exactly_the_assistant_spans(tok):
    ids, labels = tokenize_conversation(tok, Conversation("x", CHAT))
    # the ids are the template's own tokenisation of the conversation
    assert ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    # Independently, in token space: every assistant turn is the header <|im_start|>assistant\n, then the content's
    # tokens, <|im_end|> and the newline the template closes a turn with; those tokens, and only those, carry labels.
    header, newline = ids_of(tok, "<|im_start|>assistant\n"), ids_of(tok, "\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end == tok.eos_token_id
    expected = [IGNORE_INDEX] * len(ids)
    at = 0
    for m in (m for m in CHAT if m["role"] == "assistant"):
        at = find(ids, header, at) + len(header)
        turn = ids_of(tok, m["content"]) + [im_end] + newline
        assert ids[at:at + len(turn)] == turn
        expected[at:at + len(turn)] = turn
        at += len(turn)
    assert labels == expected
    # the first answer's text also sits in a user message: that copy carries no label
    user_copy = find(ids, ids_of(tok, " The sky is blue."))
    assert all(label == IGNORE_INDEX for label in labels[user_copy:user_copy + 5])
    kept = tok.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert kept == "The sky is blue.<|im_end|>\nGrass is green, mostly.<|im_end|>\n"


def test_prompt_completion_labels_only_the_completion(tmp_path, tok, plain_tok):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "The capital of France is", "completion": " Paris."}])
    cfg = DataConfig(kind="chat", path=path, seq_len=128)
    (conv,) = read_conversations(cfg)
    # with a template: a user turn, then an assistant turn whose content and end carry the loss
    ids, labels = tokenize_conversation(tok, conv)
    assert ids == tok.apply_chat_template([{"role": "user", "content": "The capital of France is"},
                                           {"role": "assistant", "content": " Paris."}], tokenize=True, return_dict=False)
    n = len(ids_of(tok, " Paris.<|im_end|>\n"))
    assert labels[-n:] == ids[-n:] and set(labels[:-n]) == {IGNORE_INDEX}
    # without one: the prompt's tokens, then the completion's and EOS, which alone carry labels
    ids, labels = tokenize_conversation(plain_tok, conv)
    prompt, completion = ids_of(tok, "The capital of France is"), ids_of(tok, " Paris.") + [tok.eos_token_id]
    assert ids == prompt + completion
    assert labels == [IGNORE_INDEX] * len(prompt) + completion
    row = build_source(cfg, plain_tok, seed=0)[0]
    assert row.labels[:len(ids)].tolist() == labels and set(row.labels[len(ids):].tolist()) == {IGNORE_INDEX}


def test_a_tokenizer_without_a_template_is_refused_naming_it(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"}, {"messages": CHAT}])
    with pytest.raises(ConfigError) as e:
        build_source(DataConfig(kind="chat", path=path, seq_len=128), plain_tok, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "has no chat template" in msg and plain_tok.name_or_path in msg and f"{path}:2" in msg


# --- packing is exact: each conversation gets the loss it gets alone ---------------------------


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    fields = {**tiny_model_config(), "vocab_size": vocab}
    fields.pop("model_type")
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).float().eval()


def summed_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (0 where ignored) of one row, as transformers shifts it: logits at t predict labels at t+1."""
    target = torch.nn.functional.pad(labels[1:], (0, 1), value=IGNORE_INDEX)
    return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")


@torch.no_grad()
def test_packed_conversations_each_get_the_loss_they_get_alone(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, *({"messages": m} for m in MORE),
                                              {"prompt": "Translate 'chat' to English:", "completion": " cat"}])
    convs = [tokenize_conversation(tok, c) for c in read_conversations(DataConfig(kind="chat", path=path))]
    lengths = [len(ids) for ids, _ in convs]
    model = tiny_llama(len(tok))
    alone = []
    for ids, labels in convs:  # each conversation on its own: the summed loss over its labels
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), num_items_in_batch=1, use_cache=False)
        alone.append(out.loss)
    assert all(loss > 0 for loss in alone)

    seq_len = sum(lengths) + 7  # all in one row, with padding after them
    source = build_source(DataConfig(kind="chat", path=path, seq_len=seq_len), tok, seed=0)
    assert isinstance(source, PackedConversations) and len(source) == 1
    row = source[0]
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    assert [int(row.position_ids[s]) for s in starts] == [0] * len(starts)
    n = batch_loss_tokens = int((row.labels[1:] != IGNORE_INDEX).sum())
    assert batch_loss_tokens == sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in convs)
    # No attention mask: transformers' sdpa path finds the packed sequences from the restarting position ids.
    out = model(input_ids=row.input_ids[None], position_ids=row.position_ids[None], labels=row.labels[None],
                num_items_in_batch=n, use_cache=False)
    per_token = summed_token_losses(out.logits[0], row.labels)
    for k, (start, length) in enumerate(zip(starts, lengths)):
        torch.testing.assert_close(per_token[start:start + length].sum(), alone[k], rtol=1e-5, atol=1e-4,
                                   msg=f"conversation {k}")
    torch.testing.assert_close(out.loss * n, torch.stack(alone).sum(), rtol=1e-5, atol=1e-4)
    # the comparison has teeth: with positions that do not restart, the later conversations see the earlier ones
    leaky = model(input_ids=row.input_ids[None], labels=row.labels[None], num_items_in_batch=n, use_cache=False).loss
    assert abs(float(leaky * n) - float(out.loss * n)) > 1e-2

    # several rows: whole conversations, as many as fit, in order, each row padded with no labels
    seq_len = 2 * max(lengths)
    rows = build_source(DataConfig(kind="chat", path=path, seq_len=seq_len), tok, seed=0)
    assert 1 < len(rows) < len(convs)
    k = 0
    for i in range(len(rows)):
        ids, labels, pos = rows[i].input_ids.tolist(), rows[i].labels.tolist(), rows[i].position_ids.tolist()
        at = 0
        while k < len(convs) and at + lengths[k] <= seq_len:  # the next conversation fits: it is in this row
            assert ids[at:at + lengths[k]] == convs[k][0] and labels[at:at + lengths[k]] == convs[k][1]
            assert pos[at:at + lengths[k]] == list(range(lengths[k]))
            at, k = at + lengths[k], k + 1
        assert set(labels[at:]) <= {IGNORE_INDEX} and pos[at:] == list(range(seq_len - at))
    assert k == len(convs)
    # unpacked: one conversation per row, padded with no labels, with the loss it has alone
    unpacked = build_source(DataConfig(kind="chat", path=path, seq_len=max(lengths) + 1, packing=False), tok, seed=0)
    assert len(unpacked) == len(convs)
    for k, (ids, labels) in enumerate(convs):
        r = unpacked[k]
        assert r.input_ids[:len(ids)].tolist() == ids and r.labels[:len(ids)].tolist() == labels
        assert set(r.labels[len(ids):].tolist()) == {IGNORE_INDEX} and r.position_ids[len(ids)] == 0
        loss = model(input_ids=r.input_ids[None], position_ids=r.position_ids[None], labels=r.labels[None],
                     num_items_in_batch=1, use_cache=False).loss
        torch.testing.assert_close(loss, alone[k], rtol=1e-5, atol=1e-4)


# --- conversations longer than data.seq_len -----------------------------------------------------


def test_too_long_is_an_error_by_default_and_truncate_or_drop_are_reported(tmp_path, tok, capsys):
    long_chat = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time. " * 30}]
    late_answer = [{"role": "user", "content": "Wait for it. " * 60}, {"role": "assistant", "content": "Done."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": MORE[0]}, {"messages": long_chat}, {"messages": late_answer}])
    seq_len = 128
    with pytest.raises(ConfigError) as e:
        build_source(DataConfig(kind="chat", path=path, seq_len=seq_len), tok, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "2 of 3 conversations are longer than data.seq_len=128" in msg and f"{path}:2" in msg
    assert "data.chat.too_long=truncate" in msg

    capsys.readouterr()
    truncated = build_source(DataConfig(kind="chat", path=path, seq_len=seq_len, chat={"too_long": "truncate"}), tok, 0)
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "2 longer than data.seq_len truncated to it (1 of them dropped" in line
    # the story is cut to its first seq_len tokens (an answer without its end); the late answer had none left
    assert (truncated.conversations, truncated.truncated, truncated.dropped) == (2, 1, 1)
    assert len(truncated) == 2 and int(truncated[1].position_ids[-1]) == seq_len - 1
    assert (truncated[1].labels != IGNORE_INDEX).any()

    dropped = build_source(DataConfig(kind="chat", path=path, seq_len=seq_len, chat={"too_long": "drop"}), tok, 0)
    assert "2 longer than data.seq_len dropped" in capsys.readouterr().out
    assert (dropped.conversations, dropped.truncated, dropped.dropped, len(dropped)) == (1, 0, 2, 1)


# --- malformed records: one line naming the file and line ---------------------------------------

GOOD = {"messages": MORE[0]}
MALFORMED = {
    "missing-role": ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]},
                     r"messages\[0\] has no 'role'"),
    "unknown-role": ({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                     r"messages\[0\] has role 'human'; expected one of system, user, assistant, tool"),
    "empty-conversation": ({"messages": []}, "'messages' is an empty conversation"),
    "non-string-content": ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}]},
                           r"messages\[0\] \(user\): 'content' holds a list, not text"),
    "missing-content": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
                        r"messages\[1\] \(assistant\) has no 'content'"),
    "missing-messages": ({"text": "a document"}, "has no field 'messages' \\(nor 'prompt' and 'completion'\\)"),
    "messages-not-a-list": ({"messages": "hi"}, "'messages' holds a str, not a list"),
    "message-not-an-object": ({"messages": ["hi", {"role": "assistant", "content": "yo"}]}, r"messages\[0\] is a str"),
    "no-assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant message"),
    "prompt-without-completion": ({"prompt": "hi"}, "has 'prompt' but no 'completion'"),
    "completion-not-text": ({"prompt": "hi", "completion": 3}, "'completion' holds a int, not text"),
    "both-forms": ({"messages": MORE[0], "prompt": "hi", "completion": "yo"}, "has both 'messages' and"),
    "not-json": ("{messages: oops", "is not valid JSON"),
    "not-an-object": ("[1, 2]", "is a JSON list, not an object with a 'messages' field"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_record_is_one_line_naming_file_and_line(tmp_path, name):
    record, expected = MALFORMED[name]
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, "", record, GOOD])  # line 3 (after a blank line)
    with pytest.raises(ConfigError) as e:
        read_conversations(DataConfig(kind="chat", path=path))
    msg = str(e.value)
    assert "\n" not in msg and f"{path}:3" in msg and re.search(expected, msg), msg


def test_parquet_and_datasets_folders_read_the_same_records_and_name_the_row(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"messages": CHAT}, *({"messages": m} for m in MORE)]
    jsonl = write_jsonl(tmp_path / "c.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    want = read_conversations(DataConfig(kind="chat", path=jsonl))
    for path in (tmp_path / "c.parquet", tmp_path / "ds"):  # the kind is found from the path (data.chat.format=auto)
        cfg = DataConfig(kind="chat", path=str(path))
        check_data_config(cfg)
        assert [c.messages for c in read_conversations(cfg)] == [c.messages for c in want]
    # a struct column fills a missing key with null: still "no 'role'", at the row
    no_role = {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}
    pq.write_table(pa.Table.from_pylist([records[1], no_role]), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'bad.parquet'} row 1: messages[0] has no 'role'")):
        read_conversations(DataConfig(kind="chat", path=str(tmp_path / "bad.parquet")))
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "text.parquet")
    with pytest.raises(ConfigError, match=r"column 'messages' \(or 'prompt' and 'completion'\) not in"):
        read_conversations(DataConfig(kind="chat", path=str(tmp_path / "text.parquet")))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ConfigError, match="neither a .jsonl/.json nor a .parquet file"):
        check_data_config(DataConfig(kind="chat", path=str(tmp_path / "x.csv")))
    with pytest.raises(ConfigError, match="holds both .jsonl/.json and .parquet files; set data.chat.format"):
        check_data_config(DataConfig(kind="chat", path=str(tmp_path)))
    # data.chat.format picks the kind in a mixed folder; a folder of parquet files is read in sorted order
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "c.jsonl", records)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "mixed" / "other.parquet")
    got = read_conversations(DataConfig(kind="chat", path=str(tmp_path / "mixed"), chat={"format": "jsonl"}))
    assert [c.messages for c in got] == [c.messages for c in want]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(records[2:]), tmp_path / "pq" / "part-1.parquet")
    pq.write_table(pa.Table.from_pylist(records[:2]), tmp_path / "pq" / "part-0.parquet")
    got = read_conversations(DataConfig(kind="chat", path=str(tmp_path / "pq")))
    assert [c.messages for c in got] == [c.messages for c in want] and got[2].where.endswith("part-1.parquet row 0")


def test_chat_config_keys(tmp_path):
    base = {"model": {"config": tiny_model_config()}}
    chat = {"too_long": "drop", "messages_field": "conv"}
    cfg = validate({**base, "data": {"kind": "chat", "path": "x.jsonl", "chat": chat}})
    assert cfg.data.chat.too_long == "drop" and cfg.data.chat.messages_field == "conv"
    assert validate({**base, "data": {"kind": "chat", "path": "x"}}).data.chat.too_long == "error"
    cases = {
        "did you mean data.chat.too_long?": {"kind": "chat", "path": "x", "chat": {"too_lng": "drop"}},
        "did you mean data.chat.messages_field?": {"kind": "chat", "path": "x", "chat": {"message_field": "m"}},
        "data.chat.too_long: got 'cut'; expected one of 'error', 'truncate' or 'drop'":
            {"kind": "chat", "path": "x", "chat": {"too_long": "cut"}},
        "data.chat is set but data.kind=jsonl": {"kind": "jsonl", "path": "x", "chat": {"too_long": "drop"}},
        "data.kind=chat needs data.path": {"kind": "chat"},
        "must differ": {"kind": "chat", "path": "x", "chat": {"prompt_field": "messages"}},
    }
    for expected, data in cases.items():
        with pytest.raises(ConfigError) as e:
            validate({**base, "data": copy.deepcopy(data)})
        assert expected in str(e.value), str(e.value)


# --- end to end ---------------------------------------------------------------------------------


def test_train_runs_on_chat_data(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, *({"messages": m} for m in MORE),
                                                 {"prompt": "Say yes.", "completion": " Yes."}] * 3)
    tiny = json.dumps(tiny_model_config())  # a tiny random Llama with SmolLM2's tokenizer: seconds, not minutes
    run = tmp_path / "run"
    r = run_cli("train", "configs/quickstart.yaml", "model.path=null", f"model.config={tiny}",
                f"model.tokenizer={tokenizer_dir}", "data.kind=chat", f"data.path={data}", "data.seq_len=256",
                "train.max_steps=2", "checkpoint.every_n_steps=0", "data.passkey.eval_samples=0",
                f"run.output_dir={run}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data.kind=chat: 15 conversations" in r.stdout
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
