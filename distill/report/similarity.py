"""How alike a student's answers are to its teacher's: the output-similarity columns of the evaluation report.

Both models answer the same held-out prompts with the same decoding settings (`generate`): every prompt
through the tokenizer's chat template when it has one, and prompt i drawing its randomness from its own
generator seeded by (seed, i) (`distill.teacher.generate`, the sampler `launch.generate` uses: the same
draws as that command's sample 0 of prompt i at the same seed), so an answer does not depend on the batch it
ran in. The student's answers are then compared with the teacher's (`output_similarity`):

- exact match: the fraction of prompts whose answers are the same text (stripped);
- token agreement (only when both models share one tokenizer): over every token the teacher generated,
  the fraction where the student generated the same token at the same position of its answer (a position
  past the end of the student's answer counts as a disagreement; tokens the student generated past the end
  of the teacher's answer are not counted);
- BLEU: sacrebleu's corpus BLEU of the student's answers against the teacher's as the single reference
  (default settings: 13a tokenisation, exponential smoothing of zero n-gram counts), on sacrebleu's 0-100
  scale (0 when the answers hold no token, even if they are equal);
- ROUGE-L: the mean over prompts of rouge-score's ROUGE-L F-measure of the student's answer against the
  teacher's (its default tokenisation: lowercased, split at every character outside a-z and 0-9,
  Porter-stemmed; a pair where either side has no word scores 0, even if they are equal), on a 0-1 scale.

`judge_agreement` optionally asks a local causal LM (the judge) whether two answers say the same thing and
reads its next-token probabilities of the two answer words.
"""

from __future__ import annotations

import inspect

import torch
from rouge_score import rouge_scorer
from sacrebleu import corpus_bleu

from distill.data.completions import prompt_ids
from distill.teacher.generate import generate as sample
from distill.teacher.generate import sample_seed

EXAMPLES = 3  # (prompt, teacher answer, student answer) triples kept for the report
JUDGE_TEMPLATE = (
    "Question: {prompt}\n"
    "Answer A: {reference}\n"
    "Answer B: {candidate}\n"
    "Do answers A and B say the same thing? Answer {yes} or {no}.\n"
    "Answer:"
)


def _stop_and_pad_ids(model: torch.nn.Module, tokenizer) -> tuple[list[int], int]:
    """Generation stops at the tokenizer's EOS and at the EOS ids of the model's config and generation config
    (as `launch.generate` reads them from the folder); pads with the tokenizer's pad token, else the smallest
    stop id."""
    stops = {tokenizer.eos_token_id}
    for config in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(config, "eos_token_id", None)
        stops |= set(eos if isinstance(eos, list | tuple) else [eos])
    stops.discard(None)
    if not stops:
        raise ValueError(
            "neither the tokenizer nor the model defines an EOS token, so answers could never end"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    return sorted(stops), pad


def _encode(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    """The prompt's token ids: `distill.data.completions.prompt_ids` (the chat template with the assistant
    turn opened when the tokenizer has one, else the plain text) when `chat_template`, else the plain text;
    no special tokens are added to plain text."""
    if chat_template:
        return prompt_ids(tokenizer, prompt)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch: int = 8,
    chat_template: bool = True,
) -> list[dict]:
    """One answer per prompt, in order: {"prompt": the prompt as given, "ids": the generated token ids
    (list[int], the stop token excluded), "text": their decoding without special tokens, stripped,
    "finished": a stop token ended the answer (else it ran to `max_new_tokens`)}.

    Prompts are encoded by `_encode` and run `batch` at a time in the given order, left-padded, with a KV
    cache, by `distill.teacher.generate.generate`: greedy when `temperature` is 0, else sampled from
    softmax(logits / temperature) restricted to its top-`top_p` nucleus, prompt i drawing its uniforms from
    a generator seeded with `sample_seed(seed, i, 0)` whatever `batch` is. Stop tokens: `_stop_and_pad_ids`.
    The model runs on its own device under torch.no_grad in eval mode; its train/eval mode is restored
    afterwards."""
    if max_new_tokens < 1 or batch < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch={batch} must both be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    encoded = [_encode(tokenizer, p, chat_template) for p in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompt {empty[0]} encodes to no tokens; every prompt must be non-empty")
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]), default=None)
    if limit and longest is not None and len(encoded[longest]) + max_new_tokens > limit:
        raise ValueError(
            f"prompt {longest} has {len(encoded[longest])} tokens; with max_new_tokens={max_new_tokens} that "
            f"exceeds the model's context ({limit})"
        )
    stop_ids, pad_id = _stop_and_pad_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch):
                indices = range(start, min(start + batch, len(prompts)))
                results += sample(
                    model,
                    [encoded[i] for i in indices],
                    [sample_seed(seed, i, 0) for i in indices],
                    max_new_tokens,
                    temperature,
                    top_p,
                    stop_ids,
                    pad_id,
                )
    finally:
        model.train(was_training)
    answers = []
    for prompt, result in zip(prompts, results):
        ids = result["completion_ids"][:-1] if result["finished"] else result["completion_ids"]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        answers.append({"prompt": prompt, "ids": ids, "text": text, "finished": bool(result["finished"])})
    return answers


def output_similarity(teacher: list[dict], student: list[dict], same_tokenizer: bool) -> dict:
    """The module docstring's comparison of the student's answers with the teacher's, prompt i with prompt i
    (`generate`'s dicts; "ids" and "text" are read, "prompt" and "finished" when present): `prompts`,
    `exact_match`, `token_agreement` (None unless `same_tokenizer`, and None when the teacher generated no
    token at all), `bleu` (0-100), `rouge_l` (0-1), `mean_length_teacher`, `mean_length_student` (generated
    tokens per answer, stop token excluded), `finished_teacher`, `finished_student` (fraction of answers a
    stop token ended; None when the dicts have no "finished"), and `examples`: the first 3 prompts'
    {"prompt" (None when the dicts have none), "teacher", "student"} texts."""
    if not teacher:
        raise ValueError("output_similarity needs at least one prompt; both answer lists are empty")
    if len(teacher) != len(student):
        raise ValueError(f"{len(teacher)} teacher answers but {len(student)} student answers: one per prompt")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.get("prompt") != s.get("prompt"):
            raise ValueError(
                f"answer {i} is to {t.get('prompt')!r} for the teacher, {s.get('prompt')!r} for the student"
            )
    n = len(teacher)
    teacher_texts = [t["text"].strip() for t in teacher]
    student_texts = [s["text"].strip() for s in student]
    token_agreement = None
    if same_tokenizer:
        positions = sum(len(t["ids"]) for t in teacher)
        # zip stops at the shorter answer: the teacher's positions past the student's end count as misses
        same = sum(sum(a == b for a, b in zip(t["ids"], s["ids"])) for t, s in zip(teacher, student))
        token_agreement = same / positions if positions else None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(t, s)["rougeL"].fmeasure for t, s in zip(teacher_texts, student_texts)]

    def finished(answers: list[dict]) -> float | None:
        if not all("finished" in a for a in answers):
            return None
        return sum(bool(a["finished"]) for a in answers) / n

    return {
        "prompts": n,
        "exact_match": sum(t == s for t, s in zip(teacher_texts, student_texts)) / n,
        "token_agreement": token_agreement,
        "bleu": corpus_bleu(student_texts, [teacher_texts]).score,
        "rouge_l": sum(rouge) / n,
        "mean_length_teacher": sum(len(t["ids"]) for t in teacher) / n,
        "mean_length_student": sum(len(s["ids"]) for s in student) / n,
        "finished_teacher": finished(teacher),
        "finished_student": finished(student),
        "examples": [
            {"prompt": t.get("prompt"), "teacher": tt, "student": st}
            for t, tt, st in list(zip(teacher, teacher_texts, student_texts))[:EXAMPLES]
        ],
    }


def _judge_text(tokenizer, question: str) -> str:
    """The judge's prompt as text: `question` as the user turn of the judge's chat template with the assistant
    turn opened when its tokenizer has one (as `distill.data.completions.prompt_ids` does), else as is."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return question


def answer_id(tokenizer, text: str, word: str) -> int:
    """The token id of `word` as the judge's next token after the prompt `text`: the tokenizer encodes
    `text` + `word` (with a space before `word` unless `text` ends in whitespace: " Yes" after "Answer:",
    "Yes" after a chat template's opened assistant turn), no special tokens added; that must be the
    encoding of `text` plus exactly one token, whose id this returns. Else a ValueError."""
    continuation = word if text[-1:].isspace() else " " + word
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text + continuation, add_special_tokens=False)["input_ids"]
    if len(full) != len(prompt) + 1 or full[: len(prompt)] != prompt:
        common = next(
            (k for k, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full))
        )
        pieces = tokenizer.convert_ids_to_tokens(full[common:])
        raise ValueError(
            f"the judge's tokenizer does not encode the answer {continuation!r} after the prompt as one "
            f"token (it encodes as {pieces} there); judge_agreement reads the judge's "
            f"probability of one answer token: use a judge whose tokenizer has {word!r} as a single token, "
            f"or pass answers=(yes, no) words that are single tokens there"
        )
    return full[-1]


def judge_agreement(
    judge_model: torch.nn.Module,
    judge_tokenizer,
    prompts: list[str],
    teacher_texts: list[str],
    student_texts: list[str],
    template: str = JUDGE_TEMPLATE,
    batch: int = 8,
    answers: tuple[str, str] = ("Yes", "No"),
) -> dict:
    """A local causal LM as judge of whether each student answer says what the teacher's does.

    Pair i's question is `template.format(prompt=prompts[i], reference=teacher_texts[i],
    candidate=student_texts[i], yes=answers[0], no=answers[1])`, turned into the judge's prompt by
    `_judge_text` and encoded without added special tokens. Its score is P(yes) / (P(yes) + P(no)) =
    softmax over the two logits of the judge's next-token distribution after the prompt (float64), where yes
    and no are the token ids `answer_id` gives for answers[0] and answers[1] after that prompt (a ValueError
    when either is not a single token there, or both are the same token). Prompts run `batch` at a time,
    left-padded (position ids counted from each prompt's first token), under torch.no_grad in eval mode
    (the judge's mode is restored afterwards), on the judge's device.

    Returns {"mean_score": mean of the scores, "agree_fraction": fraction of scores > 0.5, "pairs": number
    of pairs, "template": `template`, "answers": list(answers), "scores": each pair's score}."""
    if not prompts:
        raise ValueError("judge_agreement needs at least one (prompt, teacher answer, student answer) triple")
    if not len(prompts) == len(teacher_texts) == len(student_texts):
        raise ValueError(
            f"{len(prompts)} prompts, {len(teacher_texts)} teacher answers and {len(student_texts)} student "
            "answers: one of each per pair"
        )
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    yes, no = answers
    texts = [
        _judge_text(judge_tokenizer, template.format(prompt=p, reference=t, candidate=s, yes=yes, no=no))
        for p, t, s in zip(prompts, teacher_texts, student_texts)
    ]
    encoded = [judge_tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    pair_ids = [[answer_id(judge_tokenizer, text, word) for word in answers] for text in texts]
    for i, (yes_id, no_id) in enumerate(pair_ids):
        if yes_id == no_id:
            raise ValueError(f"the answers {answers} are the same token ({yes_id}) after pair {i}'s prompt")
    pad = judge_tokenizer.pad_token_id if judge_tokenizer.pad_token_id is not None else 0
    device = next(judge_model.parameters()).device
    last_only = (  # the head on the last position only, where the model's forward takes it
        {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(judge_model.forward).parameters else {}
    )
    was_training = judge_model.training
    judge_model.eval()
    scores: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch):
                rows = encoded[start : start + batch]
                width = max(map(len, rows))
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                attention = torch.zeros_like(ids)
                for row, prompt in enumerate(rows):
                    ids[row, width - len(prompt) :] = torch.tensor(prompt)
                    attention[row, width - len(prompt) :] = 1
                positions = (attention.cumsum(-1) - 1).clamp(min=0)
                logits = judge_model(
                    input_ids=ids.to(device),
                    attention_mask=attention.to(device),
                    position_ids=positions.to(device),
                    **last_only,
                ).logits[:, -1]
                two = logits.double().gather(-1, torch.tensor(pair_ids[start : start + batch], device=device))
                scores += torch.softmax(two, dim=-1)[:, 0].tolist()
    finally:
        judge_model.train(was_training)
    return {
        "mean_score": sum(scores) / len(scores),
        "agree_fraction": sum(score > 0.5 for score in scores) / len(scores),
        "pairs": len(scores),
        "template": template,
        "answers": list(answers),
        "scores": scores,
    }
