"""Build tiny randomly initialised HuggingFace NLP models and write the outputs transformers
gives for fixed texts, so that Cresset's Rust tokenizers, encoders, heads and pipelines can be
checked against them (float32, max abs diff 1e-4).

Usage: python scripts/make_nlp_fixtures.py REPO_ROOT MINILM_DIR
Writes (git-ignored, recreated from scratch) REPO_ROOT/tests/fixtures/generated/nlp/:
  {bert,roberta,distilbert}-base   *Model                         config.json, model.safetensors,
  {bert,roberta,distilbert}-seq    *ForSequenceClassification     tokenizer.json,
  {bert,roberta,distilbert}-tok    *ForTokenClassification        tokenizer_config.json, ...
  {bert,roberta,distilbert}-qa     *ForQuestionAnswering
  bert-seq-sharded                 bert-seq again, as sharded safetensors with an index
  gpt2                             GPT2LMHeadModel
  expected.json                    inputs and reference outputs; written last, atomically
BERT and DistilBERT use MINILM_DIR's WordPiece tokenizer files as they are (padding and
truncation baked into tokenizer.json); RoBERTa and GPT-2 use byte-level BPE tokenizers trained
here on a small corpus. "minilm" holds the real MINILM_DIR model's sentence embeddings.

Weights are drawn with std 0.2 (not 0.02) so that outputs really depend on the input, and each
head's output layer is scaled up and its bias shifted so that labels, entities and answers are
not all alike. transformers 5 has no question-answering pipeline: answer_question() is 4.x's.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import pathlib
import shutil
import sys

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, processors
from fixture_common import CORPUS, train_byte_level_bpe
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    GPT2Tokenizer,
    RobertaConfig,
    RobertaTokenizer,
    pipeline,
)
from transformers.pipelines.document_question_answering import select_starts_ends


TEXTS = [
    "Hello world, how are you?",
    "Marie Curie moved to Paris in 1891 and loved the café near the river.",
    "On Tuesday, John Smith flew from New York to Berlin for 3 meetings; afterwards he "
    "relaxed in a small café, reading quietly.",
]
SINGLE_TEXT = "The weather in London is lovely today."

QA_PAIRS = [
    ("Where did Marie move?", "Marie Curie moved to Paris in 1891 to study physics."),
    ("Who wrote the letter?", "Anna wrote the letter last night before dinner, and Paul read it."),
    (
        "When does the museum open?",
        "The museum in the old town opens at 9 in the morning and closes at 6 in the evening, "
        "every day except Monday.",
    ),
]
QA_SINGLE = (
    "What is the capital of France?",
    "The capital of France is Paris, a city famous for its art.",
)
LONG_CONTEXT = (
    "The city of Lisbon lies on the western coast of Portugal, where the river Tagus meets the "
    "Atlantic Ocean. It is one of the oldest cities in Europe, older than Rome, London or Paris. "
    "In 1755 a great earthquake destroyed most of the city, and a fire burned for five days "
    "afterwards. The Marquis of Pombal rebuilt the lower town with wide streets and strong "
    "buildings. Today visitors ride the old yellow trams up the steep hills, eat pastries at a "
    "café in Belém, and listen to fado music in the evening. The famous tower of Belém was built "
    "in 1519 to guard the harbour. Every June the streets fill with music during the festival of "
    "Saint Anthony, and people grill sardines outside their houses until late at night."
)
QA_LONG = ("When was the tower of Belém built?", LONG_CONTEXT)
QA_IMPOSSIBLE = ("What colour is the dog?", "The museum opens at 9 in the morning and closes at 6.")

SENTIMENT_LABELS = ["negative", "neutral", "positive"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
ENTITY_TOKEN_FRACTION = 0.35  # how many case-0 tokens the token classifiers tag as entities
HEAD_SCALE = 5.0
INIT_STD = 0.2  # 10x the usual 0.02, so attention really mixes tokens and outputs differ by input

MINILM_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A monkey is playing drums.",
    "The new movie is awesome.",
]
GPT2_PROMPT = "The weather in London is"
GPT2_NEW_TOKENS = 32

WORDPIECE_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"
]
HEADS = {
    "base": ("base", AutoModel),
    "seq": ("sequence_classification", AutoModelForSequenceClassification),
    "tok": ("token_classification", AutoModelForTokenClassification),
    "qa": ("question_answering", AutoModelForQuestionAnswering),
}
MODEL_TYPES = ["bert", "roberta", "distilbert"]


def roberta_tokenizer() -> RobertaTokenizer:
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = train_byte_level_bpe(specials, 800)
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    tok = RobertaTokenizer(tokenizer_object=tokenizer, model_max_length=128)
    assert tok.convert_tokens_to_ids(specials) == list(range(len(specials)))
    return tok


def gpt2_tokenizer() -> GPT2Tokenizer:
    tokenizer = train_byte_level_bpe(["<|endoftext|>"], 800)
    tok = GPT2Tokenizer(tokenizer_object=tokenizer, model_max_length=128)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    return tok


def encoder_config(model_type: str, vocab_size: int, head: str):
    labels = {"seq": SENTIMENT_LABELS, "tok": NER_LABELS}.get(head)
    label_kwargs = {}
    if labels:
        label_kwargs = {
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }
    if model_type == "bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=128, hidden_act="gelu",
            initializer_range=INIT_STD, **label_kwargs,
        )
    if model_type == "roberta":
        return RobertaConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=130, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, type_vocab_size=1, hidden_act="gelu_new", initializer_range=INIT_STD,
            **label_kwargs,
        )
    return DistilBertConfig(
        vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
        max_position_embeddings=128, activation="gelu", initializer_range=INIT_STD,
        **label_kwargs,
    )


def output_layer(model) -> torch.nn.Linear:
    """The head's last Linear layer (the one producing logits)."""
    if hasattr(model, "qa_outputs"):
        return model.qa_outputs
    classifier = model.classifier
    return getattr(classifier, "out_proj", classifier)  # RoBERTa's classification head


def unpadded(batch_tensor: torch.Tensor, lengths: list[int]) -> list:
    return [row[:n].tolist() for row, n in zip(batch_tensor, lengths)]


def run_case(model, tok, head: str, items: list[tuple[str, ...]]) -> dict:
    """One padded batch through the model; outputs cut to each item's real tokens."""
    batch = tok(*map(list, zip(*items)), padding="longest", truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    hidden = out.hidden_states[-1]
    is_pair = len(items[0]) == 2
    case = {"pairs": [list(i) for i in items]} if is_pair else {"texts": [i[0] for i in items]}
    case["input_ids"] = unpadded(batch["input_ids"], lengths)
    case["last_hidden_state"] = unpadded(hidden, lengths)
    if head == "base":
        case["embedding"] = mean_pool_normalize(hidden, mask).tolist()
    elif head == "seq":
        case["logits"] = out.logits.tolist()
    elif head == "tok":
        case["logits"] = unpadded(out.logits, lengths)
    else:
        case["start_logits"] = unpadded(out.start_logits, lengths)
        case["end_logits"] = unpadded(out.end_logits, lengths)
    return case


def mean_pool_normalize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' Pooling(mean) followed by Normalize."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def check_tokenizer(model_dir: pathlib.Path, tok, items: list[tuple[str, ...]]) -> None:
    """The raw tokenizer.json, padding and truncation off, must give the ids transformers gives."""
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    raw.no_padding()
    raw.no_truncation()
    for item in items:
        expected = tok(*item, padding=False, truncation=False)["input_ids"]
        assert raw.encode(*item).ids == expected, (model_dir.name, item)


def center_sequence_logits(model, tok) -> None:
    """Subtract case 0's mean logits from the bias, so its texts do not all get one label."""
    batch = tok(TEXTS, padding="longest", truncation=True, return_tensors="pt")
    with torch.no_grad():
        output_layer(model).bias -= model(**batch).logits.mean(0)


def lower_o_bias(model, tok) -> None:
    """Shift the "O" logit down so that about ENTITY_TOKEN_FRACTION of case 0's tokens get an
    entity label."""
    batch = tok(TEXTS, padding="longest", truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[batch["attention_mask"].bool()]
        margin = logits[:, 0] - logits[:, 1:].max(-1).values
        output_layer(model).bias[0] -= torch.quantile(margin, ENTITY_TOKEN_FRACTION)


def classification_pipeline(model, tok) -> list:
    pipe = pipeline("text-classification", model=model, tokenizer=tok, top_k=None)
    out = [[{"label": r["label"], "score": float(r["score"])} for r in rs] for rs in pipe(TEXTS)]
    assert len({rows[0]["label"] for rows in out}) > 1, out
    return out


def token_classification_pipeline(model, tok) -> list:
    pipe = pipeline(
        "token-classification", model=model, tokenizer=tok, aggregation_strategy="simple"
    )
    keys = ["entity_group", "score", "word", "start", "end"]
    out = [[{k: float(e[k]) if k == "score" else e[k] for k in keys} for e in pipe(t)]
           for t in TEXTS]
    assert sum(map(len, out)) >= 3, out
    return out


def answer_question(model, tok, question, context, max_seq_len=None, doc_stride=None,
                    handle_impossible_answer=False) -> dict:
    """transformers 4.x's QuestionAnsweringPipeline (5.x removed it) for a fast tokenizer that
    pads right, with top_k=1, max_answer_len=15, align_to_words=True: the context is cut into
    overlapping spans, each run unpadded. Each span proposes its best 12 candidates (4.x's
    pre_topk = top_k * 2 + 10 when aligning to words), merged by text."""
    max_seq_len = max_seq_len or min(tok.model_max_length, 384)
    doc_stride = doc_stride or min(max_seq_len // 2, 128)
    enc = tok(
        question, context, padding=False, truncation="only_second", max_length=max_seq_len,
        stride=doc_stride, return_token_type_ids=True, return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    min_null_score = 1000000
    answers = []
    for span in range(len(enc["input_ids"])):
        ids = np.array(enc["input_ids"][span])
        p_mask = np.array([sid != 1 for sid in enc.sequence_ids(span)], dtype=np.int64)
        p_mask[ids == tok.cls_token_id] = 0
        with torch.no_grad():
            out = model(**{k: torch.tensor([enc[k][span]]) for k in tok.model_input_names})
        starts, ends, scores, min_null_score = select_starts_ends(
            out.start_logits.numpy(), out.end_logits.numpy(), p_mask,
            np.array([enc["attention_mask"][span]]), min_null_score, 12,
            handle_impossible_answer, 15,
        )
        for s, e, score in zip(starts, ends, scores):
            start, end = answer_chars(enc[span], s, e)
            text = context[start:end]
            same = [a for a in answers if a["answer"].lower() == text.lower()]
            if same:
                same[0]["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": start, "end": end, "answer": text})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    best = sorted(answers, key=lambda a: a["score"], reverse=True)[0]
    return {
        "question": question, "context": context, "max_seq_len": max_seq_len,
        "doc_stride": doc_stride, "handle_impossible_answer": handle_impossible_answer, **best,
    }


def answer_chars(encoding, s, e) -> tuple[int, int]:
    """Character span of the context words holding tokens s..e (their offsets if not words)."""
    try:
        start = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=1)[0]
        end = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=1)[1]
    except Exception:
        start, end = encoding.offsets[s][0], encoding.offsets[e][1]
    return start, end


def qa_pipeline(model, tok) -> list:
    return [
        answer_question(model, tok, *QA_PAIRS[0]),
        answer_question(model, tok, *QA_PAIRS[1]),
        answer_question(model, tok, *QA_LONG, max_seq_len=48, doc_stride=16),
        answer_question(model, tok, *QA_IMPOSSIBLE, handle_impossible_answer=True),
    ]


def make_encoder(out: pathlib.Path, model_type: str, head: str, seed: int, save_tokenizer) -> dict:
    model_dir = out / f"{model_type}-{head}"
    save_tokenizer(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if model_type == "distilbert":
        tok.model_input_names = ["input_ids", "attention_mask"]  # DistilBERT has no token types
    torch.manual_seed(seed)
    config = encoder_config(model_type, len(tok), head)
    model = HEADS[head][1].from_config(config, attn_implementation="eager").eval()
    if head != "base":
        with torch.no_grad():
            output_layer(model).weight.mul_(HEAD_SCALE)
    if head == "seq":
        center_sequence_logits(model, tok)
    if head == "tok":
        lower_o_bias(model, tok)
    model.save_pretrained(model_dir)

    if head == "qa":
        cases = [QA_PAIRS, [QA_SINGLE]]
        check_tokenizer(model_dir, tok, QA_PAIRS + [QA_SINGLE, QA_LONG, QA_IMPOSSIBLE])
    else:
        cases = [[(t,) for t in TEXTS], [(SINGLE_TEXT,)]]
        check_tokenizer(model_dir, tok, cases[0] + cases[1])
    entry = {
        "model_type": model_type,
        "head": HEADS[head][0],
        "cases": [run_case(model, tok, head, items) for items in cases],
    }
    pipe = {"seq": classification_pipeline, "tok": token_classification_pipeline, "qa": qa_pipeline}
    if head in pipe:
        entry["pipeline"] = pipe[head](model, tok)
    if head == "seq" and model_type == "bert":
        save_sharded(model, out / "bert-seq-sharded", save_tokenizer)
    return entry


def save_sharded(model, model_dir: pathlib.Path, save_tokenizer) -> None:
    save_tokenizer(model_dir)
    model.save_pretrained(model_dir, max_shard_size="2MB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("model-*.safetensors"))) >= 2


def wordpiece_saver(minilm_dir: pathlib.Path):
    def save(model_dir: pathlib.Path) -> None:
        model_dir.mkdir(parents=True)
        for name in WORDPIECE_FILES:
            shutil.copy(minilm_dir / name, model_dir / name)

    return save


def make_gpt2(out: pathlib.Path, tok: GPT2Tokenizer) -> dict:
    model_dir = out / "gpt2"
    tok.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(100)
    config = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=0, eos_token_id=0, initializer_range=INIT_STD,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(model_dir)
    check_tokenizer(model_dir, tok, [(GPT2_PROMPT,)])

    batch = tok(GPT2_PROMPT, padding=False, truncation=False, return_tensors="pt")
    with torch.no_grad():
        logits_last = model(**batch).logits[0, -1]
        generated = model.generate(
            **batch, do_sample=False, max_new_tokens=GPT2_NEW_TOKENS,
            output_logits=True, return_dict_in_generate=True,
        )
    new_ids = generated.sequences[0, batch["input_ids"].shape[1]:].tolist()
    assert len(new_ids) == GPT2_NEW_TOKENS
    top2 = torch.cat(generated.logits).topk(2, -1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, "a greedy step is a near tie"
    return {
        "dir": "gpt2",
        "prompt": GPT2_PROMPT,
        "prompt_ids": batch["input_ids"][0].tolist(),
        "logits_last": logits_last.tolist(),
        "greedy_ids": new_ids,
        "greedy_text": tok.decode(new_ids, skip_special_tokens=True),
    }


def make_minilm(minilm_dir: pathlib.Path) -> dict:
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    batch = tok(MINILM_SENTENCES, padding="longest", truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return {
        "sentences": MINILM_SENTENCES,
        "input_ids": unpadded(batch["input_ids"], batch["attention_mask"].sum(1).tolist()),
        "embedding": mean_pool_normalize(hidden, batch["attention_mask"]).tolist(),
    }


def main(root: pathlib.Path, minilm_dir: pathlib.Path) -> None:
    out = root / "tests" / "fixtures" / "generated" / "nlp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    roberta_tok = roberta_tokenizer()
    savers = {
        "bert": wordpiece_saver(minilm_dir),
        "distilbert": wordpiece_saver(minilm_dir),
        "roberta": roberta_tok.save_pretrained,
    }
    encoders = {}
    for i, (model_type, head) in enumerate((m, h) for m in MODEL_TYPES for h in HEADS):
        name = f"{model_type}-{head}"
        encoders[name] = make_encoder(out, model_type, head, i, savers[model_type])
    expected = {
        "encoders": encoders,
        "gpt2": make_gpt2(out, gpt2_tokenizer()),
        "minilm": make_minilm(minilm_dir),
    }
    tmp = out / "expected.json.tmp"
    tmp.write_text(json.dumps(expected))
    os.replace(tmp, out / "expected.json")
    print(f"make_nlp_fixtures: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]).resolve(), pathlib.Path(sys.argv[2]).resolve())
