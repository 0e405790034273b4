"""Output similarity of a student's answers to its teacher's (distill/report/similarity.py): BLEU and ROUGE-L
against the libraries' own examples and independent computations here, token agreement by hand, seeded
generation that does not depend on the batch, and the judge's score against a direct softmax."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import sacrebleu
import torch

from distill.models import load_causal_lm, load_tokenizer
from distill.report.similarity import JUDGE_TEMPLATE, generate, judge_agreement, output_similarity

# plain-text prompts (no chat template): the tiny teacher, trained on pydoc text, continues them with words
PROMPTS = ["The with statement", "A class definition is", "If the exception", "The return value of"]
NEW_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are small: a second thread only contends with other jobs on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_causal_lm(tiny_teacher_dir, "float32", "sdpa", "cpu")


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    return load_causal_lm(tiny_student_dir, "float32", "sdpa", "cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir):
    return load_tokenizer(tiny_teacher_dir)


def answers(texts: list[str], ids: list[list[int]] | None = None) -> list[dict]:
    return [{"ids": [] if ids is None else ids[i], "text": t} for i, t in enumerate(texts)]


def words(text: str) -> list[str]:
    """sacrebleu's 13a tokenisation on the sentences below: words (with apostrophes) and punctuation."""
    return re.findall(r"[\w']+|[^\w\s]", text)


def reference_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) with one reference per sentence, from clipped n-gram counts (n = 1..4) and the
    brevity penalty exp(1 - r / c) when the hypotheses' length c is below the references' r."""
    matches, totals, c, r = [0] * 4, [0] * 4, 0, 0
    for hyp, ref in zip(hypotheses, references):
        h, g = words(hyp), words(ref)
        c, r = c + len(h), r + len(g)
        for n in range(1, 5):
            hyp_grams = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            ref_grams = Counter(tuple(g[i : i + n]) for i in range(len(g) - n + 1))
            matches[n - 1] += sum(min(k, ref_grams[gram]) for gram, k in hyp_grams.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    brevity = 1.0 if c >= r else math.exp(1 - r / c)
    return 100 * brevity * math.exp(sum(math.log(m / t) for m, t in zip(matches, totals)) / 4)


def test_bleu_against_sacrebleu_example_and_hand_computation():
    refs = [
        ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
    ]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    assert sacrebleu.corpus_bleu(hyps, refs).score == pytest.approx(48.53, abs=0.005)  # its README
    # our BLEU has the teacher as the single reference: the README's example with its first reference
    result = output_similarity(answers(refs[0]), answers(hyps), same_tokenizer=True)
    assert result["bleu"] == pytest.approx(reference_bleu(hyps, refs[0]), abs=1e-9)
    assert result["bleu"] == pytest.approx(45.07, abs=0.005)
    # a student shorter than the teacher: the brevity penalty (every n-gram of the student matches)
    teacher = ["the cat sat on the mat today", "a dog ran in the big park"]
    short = ["the cat sat on the mat", "a dog ran in the park"]
    result = output_similarity(answers(teacher), answers(short), same_tokenizer=True)
    assert result["bleu"] == pytest.approx(reference_bleu(short, teacher), abs=1e-9)
    assert result["bleu"] < 100 * math.exp(1 - 14 / 12) + 1e-9  # below the penalty alone: one 4-gram misses


def lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_against_rouge_score_example_and_lcs():
    teacher = ["The quick brown fox jumps over the lazy dog", "Same words here."]
    student = ["The quick brown dog jumps on the log.", "  Same words here."]
    result = output_similarity(answers(teacher), answers(student), same_tokenizer=False)
    t, s = (re.findall(r"[a-z0-9]+", x.lower()) for x in (teacher[0], student[0]))
    k = lcs(t, s)  # "the quick brown jumps the": 5 of 9 and of 8 words
    precision, recall = k / len(s), k / len(t)
    first = 2 * precision * recall / (precision + recall)
    assert first == pytest.approx(0.5882352941176471)  # rouge-score's README
    assert result["rouge_l"] == pytest.approx((first + 1.0) / 2)  # the mean over prompts; pair 2 is equal
    assert result["exact_match"] == 0.5  # stripped texts: pair 2 matches
    assert result["token_agreement"] is None


def test_token_agreement_by_hand():
    teacher = [{"ids": [1, 2, 3, 4], "text": "a"}, {"ids": [5, 6], "text": "b"}]
    student = [{"ids": [1, 9, 3], "text": "a"}, {"ids": [5, 6, 7, 8], "text": "c"}]
    result = output_similarity(teacher, student, same_tokenizer=True)
    # prompt 1: positions 0 and 2 agree, 1 differs, 3 is past the student's end; prompt 2: both agree
    assert result["token_agreement"] == pytest.approx(4 / 6)
    assert result["exact_match"] == 0.5
    assert result["mean_length_teacher"] == 3 and result["mean_length_student"] == 3.5
    assert result["prompts"] == 2 and result["finished_teacher"] is None
    assert output_similarity(teacher, student, same_tokenizer=False)["token_agreement"] is None
    with pytest.raises(ValueError, match="at least one prompt"):
        output_similarity([], [], same_tokenizer=True)
    with pytest.raises(ValueError, match="one per prompt"):
        output_similarity(teacher, student[:1], same_tokenizer=True)
    with pytest.raises(ValueError, match="answer 1 is to 'q2' for the teacher, 'q3' for the student"):
        output_similarity(
            [{**t, "prompt": f"q{i + 1}"} for i, t in enumerate(teacher)],
            [{**s, "prompt": f"q{2 * i + 1}"} for i, s in enumerate(student)],
            same_tokenizer=True,
        )


def test_model_against_itself_and_another(teacher, student, tokenizer):
    teacher.train()
    greedy = generate(teacher, tokenizer, PROMPTS, NEW_TOKENS, batch=4, chat_template=False)
    assert teacher.training  # its mode is restored
    teacher.eval()
    again = generate(teacher, tokenizer, PROMPTS, NEW_TOKENS, batch=1, chat_template=False)
    assert all(a["text"] for a in greedy)  # words to compare, or BLEU and ROUGE would be 0
    same = output_similarity(greedy, again, same_tokenizer=True)
    assert (same["exact_match"], same["token_agreement"], same["rouge_l"]) == (1, 1, pytest.approx(1))
    assert same["bleu"] == pytest.approx(100)
    assert same["prompts"] == len(PROMPTS)
    assert same["mean_length_teacher"] == sum(len(a["ids"]) for a in greedy) / len(PROMPTS)
    assert [e["prompt"] for e in same["examples"]] == PROMPTS[:3]
    assert same["examples"][0]["teacher"] == greedy[0]["text"]

    other = generate(student, tokenizer, PROMPTS, NEW_TOKENS, batch=4, chat_template=False)
    result = output_similarity(greedy, other, same_tokenizer=True)
    assert 0 <= result["token_agreement"] < 1
    assert 0 <= result["exact_match"] < 1
    assert 0 <= result["bleu"] < 100 and 0 <= result["rouge_l"] < 1
    assert 0 <= result["finished_student"] <= 1
    assert result["examples"][1] == {
        "prompt": PROMPTS[1],
        "teacher": greedy[1]["text"],
        "student": other[1]["text"],
    }


def test_greedy_matches_transformers_generate_with_chat_template(teacher, tokenizer):
    """One unpadded prompt through the chat template: the same tokens as `model.generate` greedy; and a stop
    token ends an answer, excluded from its ids."""
    [ours] = generate(teacher, tokenizer, PROMPTS[:1], NEW_TOKENS)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = teacher.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    expected = out[0, ids.shape[1] :].tolist()
    assert ours["ids"] == [t for t in expected if t != tokenizer.eos_token_id]
    assert ours["finished"] == (tokenizer.eos_token_id in expected)

    plain = generate(teacher, tokenizer, PROMPTS, NEW_TOKENS, chat_template=False)
    stop = plain[0]["ids"][3]  # the model's 4th token as an extra stop token
    cut = plain[0]["ids"].index(stop)
    before = teacher.generation_config.eos_token_id
    teacher.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    try:
        [stopped] = generate(teacher, tokenizer, PROMPTS[:1], NEW_TOKENS, chat_template=False)
    finally:
        teacher.generation_config.eos_token_id = before
    assert stopped["ids"] == plain[0]["ids"][:cut] and stopped["finished"]
    assert stopped["text"] == tokenizer.decode(plain[0]["ids"][:cut], skip_special_tokens=True).strip()


def test_seeded_sampling_does_not_depend_on_the_batch(teacher, tokenizer):
    def run(batch: int, seed: int) -> list[list[int]]:
        out = generate(teacher, tokenizer, PROMPTS, NEW_TOKENS, 0.8, 0.95, seed, batch, chat_template=False)
        return [a["ids"] for a in out]

    one = run(1, 7)
    assert run(3, 7) == one  # batches of 3 and 1: other padding, same draws
    assert run(3, 7) == one  # and again
    assert run(3, 8) != one  # another seed: other draws
    greedy = generate(teacher, tokenizer, PROMPTS, NEW_TOKENS, chat_template=False)
    assert [a["ids"] for a in greedy] != one  # it did sample


def test_judge_scores_are_the_softmax_over_the_two_answer_tokens(teacher, tokenizer):
    prompts = ["What is a class?", "Define lambda.", "What does the with statement do?"]
    reference = ["A template for objects.", "An anonymous function.", "It manages a context."]
    candidate = ["A blueprint.", "An anonymous function.", "It opens files and closes them when done."]
    with pytest.raises(ValueError, match="as one token"):  # "Yes" is 3 byte-level tokens in the tiny vocab
        judge_agreement(teacher, tokenizer, prompts, reference, candidate)
    result = judge_agreement(teacher, tokenizer, prompts, reference, candidate, batch=2, answers=("Y", "N"))
    assert result["pairs"] == 3 and result["template"] == JUDGE_TEMPLATE and result["answers"] == ["Y", "N"]

    yes, no = tokenizer.convert_tokens_to_ids(["Y", "N"])
    expected = []
    for p, r, c in zip(prompts, reference, candidate):  # one prompt at a time, unpadded
        question = JUDGE_TEMPLATE.format(prompt=p, reference=r, candidate=c, yes="Y", no="N")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        assert text.endswith("assistant\n") and "Answer Y or N." in text
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0, -1].double()
        expected.append(float(torch.softmax(logits[[yes, no]], dim=0)[0]))
    assert result["scores"] == pytest.approx(expected, abs=1e-5)
    assert all(0 < s < 1 for s in result["scores"])
    assert result["mean_score"] == pytest.approx(sum(expected) / 3, abs=1e-5)
    assert result["agree_fraction"] == sum(s > 0.5 for s in expected) / 3

    with pytest.raises(ValueError, match="at least one"):
        judge_agreement(teacher, tokenizer, [], [], [])
    with pytest.raises(ValueError, match="one of each per pair"):
        judge_agreement(teacher, tokenizer, prompts, reference, candidate[:2], answers=("Y", "N"))


def test_judge_without_chat_template_answers_after_a_space(teacher, tiny_teacher_dir):
    plain = load_tokenizer(tiny_teacher_dir)
    plain.chat_template = None
    with pytest.raises(ValueError, match="' Y'"):  # after "Answer:" the answer is " Y": 2 tokens here
        judge_agreement(teacher, plain, ["q"], ["a"], ["b"], answers=("Y", "N"))
    result = judge_agreement(teacher, plain, ["q"], ["a"], ["b"], answers=("the", "is"))  # " the", " is"
    assert 0 < result["mean_score"] < 1
