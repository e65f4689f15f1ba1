"""The program-trace task generator: determinism, dependency metadata, summaries, scoring."""

import random
import re
import subprocess
import sys

import pytest

from testbed import program_trace as pt


def test_seed_determinism_and_prefix_stability():
    a = pt.generate_problems(7, 5, n_steps=(3, 9))
    b = pt.generate_problems(7, 5, n_steps=(3, 9))
    assert [p.target for p in a] == [p.target for p in b]
    assert [p.prompt for p in a] == [p.prompt for p in b]
    # A longer list starts with the shorter one; another seed gives other problems.
    assert [p.target for p in pt.generate_problems(7, 8, n_steps=(3, 9))[:5]] == [p.target for p in a]
    assert [p.target for p in pt.generate_problems(8, 5, n_steps=(3, 9))] != [p.target for p in a]


def test_sizes_vary_within_range():
    problems = pt.generate_problems(0, 30, n_steps=(4, 10))
    assert {p.n_steps for p in problems} <= set(range(4, 11))
    assert len({p.n_steps for p in problems}) > 3
    assert all(p.n_steps == 5 for p in pt.generate_problems(0, 3, n_steps=5))


def test_bad_sizes_are_refused():
    for n_steps in (0, (5, 4), pt.MAX_STEPS + 1):
        with pytest.raises(ValueError):
            pt.generate_problems(0, 1, n_steps=n_steps)
    with pytest.raises(ValueError):
        pt.generate_problems(0, 1, p_detail=1.5)


def test_hand_checked_problem():
    """Seed 2, 4 steps, checked by hand (values mod 10; v_k' = v_{k-1} + src, v_k = v_k' - x_k):
    v0 = 9
    v1: reads v0 (result 9), x=0:  v1' = 9 + 9 = 8,  v1 = 8 - 0 = 8
    v2: reads v1' (detail, 8), x=4: v2' = 8 + 8 = 6,  v2 = 6 - 4 = 2
    v3: reads v0 (result 9), x=9:  v3' = 2 + 9 = 1,  v3 = 1 - 9 = 2
    v4: reads v3 (result 2), x=2:  v4' = 2 + 2 = 4,  v4 = 4 - 2 = 2
    Thought i is step i + 1: thought 1 reads thought 0 (previous result and detail), thought 2
    reads thought 1 (previous result; v0 is the prompt), thought 3 reads thought 2 twice.
    """
    problem = pt.generate_problems(2, 1, n_steps=4)[0]
    assert problem.prompt == ("v0=9 ; v1#0 ; v2#4 ; v3#9 ; v4#2 ; v1<v0 ; v2<v1' ; v3<v0 ; v4<v3 \n"
                              " find v4 ? \n")
    assert [(s.intermediate, s.result) for s in problem.steps] == [(8, 8), (6, 2), (1, 2), (4, 2)]
    assert problem.answer == "V2"
    assert problem.dependencies == [[], [0], [1], [2], [3]]
    assert problem.detail_dependencies == [[], [0], [], [], []]
    assert problem.thoughts[1] == ("v1=8 v2 v2#4 v2<v1' v1=8 \n v1=8 v1'=8 \n V8 + V8 = V6 \n "
                                   "check V6 - V8 = V8 \n check V6 - V8 = V8 \n check V8 + V8 = V6 \n "
                                   "V6 - V4 = V2 \n check V2 + V4 = V6 \n check V6 - V2 = V4 \n "
                                   "check V4 + V2 = V6 \n v2=2 \n v2'=6")
    assert problem.summaries[1] == "<|begin_of_summary|> v2=2 <|end_of_summary|>"
    assert problem.target.endswith("<|begin_of_summary|> v4=2 <|end_of_summary|> \n\n answer = V2")
    assert problem.target == " ".join(
        sum(([t, "\n\n", s, "\n\n"] for t, s in zip(problem.thoughts, problem.summaries)), [])
        + [problem.answer_line])


@pytest.mark.parametrize("task", pt.TASKS)
def test_generated_values_and_dependencies_follow_the_rules(task):
    for problem in pt.generate_problems(11, 10, n_steps=(1, 30), task=task):
        results, intermediates = [problem.start], [None]
        for i, s in enumerate(problem.steps):
            assert s.k == i + 1 and 0 <= s.source_step < s.k
            assert not (s.detail and s.source_step == 0)  # v0 has no intermediate
            source = intermediates[s.source_step] if s.detail else results[s.source_step]
            assert (s.previous, s.source) == (results[-1], source)
            assert s.intermediate == (results[-1] + source) % 10
            assert s.result == (s.intermediate - s.input) % 10
            results.append(s.result)
            intermediates.append(s.intermediate)
            read = {s.k - 2, s.source_step - 1} - {-1}
            assert problem.dependencies[i] == sorted(read)
            assert problem.detail_dependencies[i] == ([s.source_step - 1] if s.detail else [])
            assert all(j < i for j in problem.dependencies[i])
        assert problem.answer == f"V{results[-1]}"
        assert problem.dependencies[-1] == [problem.n_steps - 1] and problem.detail_dependencies[-1] == []


@pytest.mark.parametrize("task", pt.TASKS)
def test_summaries_keep_the_result_and_drop_the_details(task):
    gist = "v{k} v{k}#{x} " if pt.TASKS[task].rich_summary else ""
    for problem in pt.generate_problems(3, 20, n_steps=(2, 12), task=task):
        for s, thought, summary in zip(problem.steps, problem.thoughts, problem.summaries):
            expected = gist.format(k=s.k, x=s.input) + f"v{s.k}={s.result}"
            assert summary == f"{pt.SUMMARY_BEGIN} {expected} {pt.SUMMARY_END}"
            # The intermediate, the input and the operands are written in the thought only.
            assert thought.endswith(f"\n v{s.k}={s.result} \n v{s.k}'={s.intermediate}")
            assert f"v{s.k}#{s.input}" in thought and f"v{s.k}'" not in summary
            assert pt.BOUNDARY not in thought  # one blank line per thought: the boundary


@pytest.mark.parametrize("task", pt.TASKS)
def test_detail_reads_are_answerable_only_from_their_thought(task):
    """A detail read's value is the intermediate written in its source's thought body, which no
    summary, no prompt fact and no other thought before the reader states."""
    seen = 0
    for problem in pt.generate_problems(5, 20, n_steps=(6, 20), task=task):
        for i, s in enumerate(problem.steps):
            if not s.detail:
                continue
            seen += 1
            word = pt.value_word(s.source_step, s.source, True)
            source_thought = s.source_step - 1
            assert word in problem.thoughts[source_thought].split(" ")
            assert word not in problem.prompt.split(" ")
            assert not any(word in x.split(" ") for x in problem.summaries)
            earlier_readers = [t for t, o in enumerate(problem.steps[:i])
                               if o.detail and o.source_step == s.source_step]
            others = [t for t in range(i) if t != source_thought and t not in earlier_readers]
            assert not any(word in problem.thoughts[t].split(" ") for t in others)
            # The line that reads it recalls the source's result (its summary) first.
            assert f"\n {pt.value_word(s.source_step, problem.steps[s.source_step - 1].result)} {word} \n" \
                in problem.thoughts[i]
    assert seen > 20


@pytest.mark.parametrize("task", pt.TASKS)
def test_text_is_single_space_joined_words(task):
    words = pt.vocabulary(task=task)
    vocab = set(words)
    assert len(vocab) == len(words)
    for problem in pt.generate_problems(2, 10, n_steps=(1, pt.MAX_STEPS), task=task):
        for text in (problem.prompt.rstrip("\n").rstrip(), problem.target):
            words = text.split(" ")
            assert all(words) and set(words) <= vocab, set(words) - vocab
        assert "\n \n" not in problem.target  # two line breaks in a row would read as a boundary
        assert problem.target.count(pt.BOUNDARY) == 2 * problem.n_steps
        assert problem.target.count(pt.SUMMARY_BEGIN) == problem.n_steps


def test_score():
    problem = pt.generate_problems(1, 1, n_steps=4)[0]
    wrong = "V0" if problem.answer != "V0" else "V1"
    assert pt.score(problem, problem.target)
    assert pt.score(problem, problem.target + " </s>")
    assert pt.score(problem, f"garbage answer={problem.answer}")
    assert not pt.score(problem, problem.target.replace(f"answer = {problem.answer}", f"answer = {wrong}"))
    assert not pt.score(problem, "")
    assert not pt.score(problem, problem.target.rsplit("answer", 1)[0])
    # The first answer line counts, not a later one.
    assert not pt.score(problem, f"answer = {wrong} \n answer = {problem.answer}")
    assert pt.parse_answer("x \n\n answer = V7") == "V7"


def test_import_is_pure_python():
    code = "import sys; import testbed.program_trace; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_output_lengths_of_the_largest_size():
    words = [len(p.target.split(" ")) for p in pt.generate_problems(0, 5, n_steps=pt.MAX_STEPS)]
    assert all(2500 <= w <= 3000 for w in words), words


def test_default_sizes_give_long_outputs_and_short_prompts():
    problems = pt.generate_problems(0, 100)
    assert {p.n_steps for p in problems} <= set(range(pt.DEFAULT_N_STEPS[0], pt.DEFAULT_N_STEPS[1] + 1))
    outputs = [len(p.target.split(" ")) + 1 for p in problems]  # + EOS
    prompts = [len(p.prompt.split(" ")) + 1 for p in problems]  # + BOS
    assert sum(outputs) / len(outputs) >= 1000 and max(outputs) < 2000
    assert all(a / (a + b) < 0.1 for a, b in zip(prompts, outputs))


def test_long_task_has_the_proportions_of_real_reasoning():
    """Thoughts of 150-300 tokens under 5-15-token summaries, outputs of 2-4K tokens, and a fifth
    of each problem's own sequence holds its prompt, every summary, a 48-token window and its
    longest thought: what one step reads, the rest is out of reach (as in a real trace)."""
    problems = pt.generate_problems(0, 40, task="long")
    assert {p.n_steps for p in problems} <= set(range(pt.TASKS["long"].n_steps[0], pt.TASKS["long"].n_steps[1] + 1))
    for p in problems:
        thoughts = [len(t.split(" ")) + 2 for t in p.thoughts]  # + the blank lines around it
        summaries = [len(s.split(" ")) for s in p.summaries]
        prompt, output = len(p.prompt.split(" ")) + 1, len(p.target.split(" ")) + 1
        assert all(150 <= t <= 300 for t in thoughts) and all(5 <= s <= 15 for s in summaries)
        assert 2000 <= output <= 4000 and prompt < 0.05 * (prompt + output)
        assert prompt + sum(summaries) + 48 + max(thoughts) <= 0.2 * (prompt + output)
        # Work lines are labelled in order, so what comes next is always in the lines just above.
        labels = [w for w in p.thoughts[0].split(" ") if re.fullmatch(r"w\d+", w)]
        assert labels == [pt.label_word(i) for i in range(1, pt.TASKS["long"].work_lines + 1)]


def test_short_task_text_is_unchanged_by_the_long_one():
    """The long task only adds words after the short task's (a short tokenizer's ids are a prefix
    of a long one's), and the short task's problems are the committed reasoner's."""
    assert pt.vocabulary(task="long")[: len(pt.vocabulary())] == pt.vocabulary()
    short, long = (pt.generate_problems(5, 3, n_steps=4, task=t) for t in ("short", "long"))
    assert [p.prompt for p in short] == [p.prompt for p in long]
    assert [p.dependencies for p in short] == [p.dependencies for p in long]
    assert all(len(b.target) > 2.5 * len(a.target) for a, b in zip(short, long))
    with pytest.raises(ValueError, match="task='medium'"):
        pt.generate_problems(0, 1, task="medium")
    with pytest.raises(ValueError, match="work_lines"):
        pt.Shape(work_lines=pt.MAX_WORK_LINES + 1)


def test_generate_problem_takes_any_rng():
    a = pt.generate_problem(random.Random(3), n_steps=6)
    b = pt.generate_problem(random.Random(3), n_steps=6)
    assert a == b and a.n_steps == 6


# --- thought indexing: ZoomR's own segmenter on the tokenized target ----------------------------

@pytest.mark.parametrize("task", pt.TASKS)
def test_dependencies_match_an_independent_reading_of_the_text(task):
    """Recompute dependencies from the thought texts alone: thought i (step k = i + 1) reads
    every ``vj=..`` / ``vj'=..`` value word of another step j >= 1 in its body, which lives in
    thought j - 1; a primed one is a detail read. The answer line reads the last result."""
    value = re.compile(r"^v(\d+)('?)=\d$")
    for problem in pt.generate_problems(4, 15, n_steps=(1, 25), task=task):
        assert len(problem.dependencies) == len(problem.detail_dependencies) == problem.n_steps + 1
        for i, thought in enumerate(problem.thoughts):
            reads, details = set(), set()
            for word in thought.split(" "):
                match = value.match(word)
                if match and int(match.group(1)) not in (0, i + 1):
                    reads.add(int(match.group(1)) - 1)
                    if match.group(2):
                        details.add(int(match.group(1)) - 1)
            assert problem.dependencies[i] == sorted(reads), (i, thought)
            assert problem.detail_dependencies[i] == sorted(details)
        assert problem.dependencies[-1] == [problem.n_steps - 1]


@pytest.fixture(scope="module", params=tuple(pt.TASKS))
def task(request):
    """Each task with its committed reasoner."""
    return request.param


@pytest.fixture(scope="module")
def tokenizer(task):
    from testbed.reasoner_model import load_tokenizer, reasoner_dir

    return load_tokenizer(reasoner_dir(task))


@pytest.fixture(scope="module")
def token_texts(tokenizer):
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def test_thought_indices_follow_zoomr_segmentation(task, tokenizer, token_texts):
    """Feed the tokenized target (+ EOS) to ThoughtSegmenter: thought i is step i + 1 (with the
    blank line before it for i > 0, its boundary and its summary), thought n_steps the answer."""
    from zoomr_sglang.algo.segmentation import ThoughtSegmenter

    for problem in pt.generate_problems(9, 4, n_steps=(2, 12), task=task):
        prompt = tokenizer(problem.prompt)["input_ids"]
        target = tokenizer(problem.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seg = ThoughtSegmenter(token_texts, boundaries=[pt.BOUNDARY], summary_begin=pt.SUMMARY_BEGIN,
                               summary_end=pt.SUMMARY_END, sentence_ends=[".", "?", "!", "\n"],
                               max_thought_tokens=512, first_position=len(prompt))
        for offset, token in enumerate(target):
            seg.feed(token, len(prompt) + offset)
        assert len(seg.thoughts) == problem.n_steps + 1

        def text(start, end):
            return " ".join(token_texts[t] for t in target[start - len(prompt): end - len(prompt)])

        for i, thought in enumerate(seg.thoughts[:-1]):
            assert thought.index == i and thought.final
            lead = "\n\n " if i else ""
            assert text(thought.start, thought.body_end) == f"{lead}{problem.thoughts[i]} \n\n"
            assert text(thought.summary_start, thought.summary_end) == problem.summaries[i]
            # The step named in the body is i + 1; the thoughts named by dependencies[i] are the
            # ones whose summaries hold the results thought i recalls.
            assert problem.thoughts[i].split(" ")[1] == f"v{i + 1}"
            for j in problem.dependencies[i]:
                summary = text(seg.thoughts[j].summary_start, seg.thoughts[j].summary_end)
                assert summary.split(" ")[1].split("=")[0] in problem.thoughts[i]
            for j in problem.detail_dependencies[i]:
                body = text(seg.thoughts[j].start, seg.thoughts[j].body_end).split(" ")
                assert any(w.startswith(f"v{j + 1}'=") and w in problem.thoughts[i].split(" ") for w in body)
        last = seg.thoughts[-1]
        assert text(last.start, last.body_end) == f"\n\n {problem.answer_line} </s>"


# --- tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_single_token_markers(task, tokenizer):
    vocab = tokenizer.get_vocab()
    assert all(word in vocab for word in pt.vocabulary(task=task))
    for marker in (pt.BOUNDARY, pt.LINE, pt.SUMMARY_BEGIN, pt.SUMMARY_END):
        ids = tokenizer.encode(marker, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.decode(ids) == marker
    for problem in pt.generate_problems(6, 3, n_steps=(1, 30), task=task):
        prompt = tokenizer(problem.prompt)["input_ids"]
        assert prompt[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in prompt
        assert len(prompt) == 1 + len(problem.prompt.split(" "))
        ids = tokenizer(problem.target, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) == len(problem.target.split(" "))
        text = tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True)
        assert text == problem.target and pt.score(problem, text)


def test_sglang_token_texts_hold_the_markers(task, tokenizer):
    """The per-token texts the ZoomR backend builds (factory.load_token_texts, through SGLang's
    own tokenizer loader): the boundary and both markers are whole tokens with exactly their text."""
    from types import SimpleNamespace

    from zoomr_sglang.attention_backend.factory import load_token_texts
    from zoomr_sglang.config import ZoomRConfig
    from testbed.reasoner_model import reasoner_dir

    runner = SimpleNamespace(
        server_args=SimpleNamespace(tokenizer_path=None, model_path=str(reasoner_dir(task)), tokenizer_mode="auto",
                                    trust_remote_code=False),
        model_config=SimpleNamespace(vocab_size=len(tokenizer)))
    texts = load_token_texts(runner, ZoomRConfig())
    vocab = tokenizer.get_vocab()
    assert texts[vocab[pt.BOUNDARY]] == "\n\n" and texts[vocab[pt.LINE]] == "\n"
    assert texts[vocab[pt.SUMMARY_BEGIN]] == pt.SUMMARY_BEGIN
    assert texts[vocab[pt.SUMMARY_END]] == pt.SUMMARY_END
    assert [i for i, t in enumerate(texts) if "\n\n" in t] == [vocab[pt.BOUNDARY]]


# --- the committed checkpoint ---------------------------------------------------------------------

def test_checkpoint_files_and_eos(task):
    import json

    from testbed.reasoner_model import reasoner_dir

    folder = reasoner_dir(task)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "training.json"):
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").stat().st_size < 8 * 2**20
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["eos_token_id"] == generation["eos_token_id"] == 2
    report = json.loads((folder / "training.json").read_text())
    assert report["parameters"] < 5_000_000 and report["steps"] == report["args"]["steps"]
    for key in ("seed", "train_seconds", "final_train_loss", "date", "hf_full_accuracy", "masked_oracle_accuracy",
                "masked_random_accuracy", "eval_avg_output_tokens"):
        assert key in report, key


def test_checkpoint_solves_short_problems(task, tokenizer):
    import torch

    from testbed.reasoner_model import load_model, reasoner_dir

    torch.set_num_threads(2)
    model = load_model(reasoner_dir(task))
    # The long reasoner's last training runs held 10-16 steps; it is asked within its task's sizes.
    sizes = (3, 5) if task == "short" else pt.TASKS[task].n_steps[0]
    for problem in pt.generate_problems(77, 2 if task == "short" else 1, n_steps=sizes, task=task):  # long: 2-3K tokens
        enc = tokenizer(problem.prompt, return_tensors="pt")
        target = tokenizer(problem.target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=len(target) + 8)
        generated = out[0, enc["input_ids"].shape[1]:].tolist()
        assert generated == target + [tokenizer.eos_token_id]  # EOS ends generation
        assert pt.score(problem, tokenizer.decode(generated, skip_special_tokens=True))


def test_train_reasoner_refuses_a_decision_weight_that_is_not_positive(capsys):
    from testbed import train_reasoner

    with pytest.raises(SystemExit):
        train_reasoner.main(["--decision-weight", "0", "--eval-only"])
    assert "--decision-weight=0.0: must be > 0" in capsys.readouterr().err
