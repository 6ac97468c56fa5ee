//! Generation: KV-cache decoding gives the full forward's logits for every architecture,
//! left-padded batches decode each row as it decodes alone, sampling is reproducible from its
//! seed, the CLI writes what `eval` reads, and greedy decoding of the real stories260K model
//! reproduces its published text.

use candle_core::{DType, Device, Tensor};
use dpo_sam::config::BuiltinModel;
use dpo_sam::decode::{generate_batch, sample, Finish, Sampling};
use dpo_sam::models::cache::KvCache;
use dpo_sam::models::{CausalLm, Model, ModelSource};
use rand::SeedableRng;
use std::path::Path;
use std::process::Command;

mod common;
use common::max_abs_diff;

fn load(spec: &str) -> Model {
    let source = ModelSource::resolve(spec, &BuiltinModel::default(), 0).unwrap();
    Model::load(&source, false, DType::F32, &Device::Cpu).unwrap()
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Logits `[b, t, vocab]` of hidden states `[b, t, hidden]`.
fn logits(net: &dyn CausalLm, hidden: &Tensor) -> Tensor {
    let (b, t, h) = hidden.dims3().unwrap();
    let l = net
        .output_layer()
        .logits(&hidden.reshape((b * t, h)).unwrap(), None)
        .unwrap();
    l.reshape((b, t, ())).unwrap()
}

fn ids(rows: &[Vec<u32>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
}

/// Two rows of `t` pseudo-random ids below `vocab`.
fn tokens(vocab: usize, t: usize) -> Vec<Vec<u32>> {
    (0..2)
        .map(|r| {
            (0..t)
                .map(|i| ((i * 37 + r * 11 + 5) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Prefill of 5 tokens, a chunk of 3, then one token at a time: every step's logits equal the
/// full forward's at the same positions.
fn check_cache_matches_full_forward(spec: &str, t: usize) {
    let model = load(spec);
    let net = model.net.as_ref();
    let vocab = net.output_layer().vocab_size().unwrap();
    let rows = tokens(vocab, t);
    let full = logits(net, &net.forward_hidden(&ids(&rows)).unwrap());
    let mut cache = KvCache::new();
    let mut start = 0;
    let mut chunks = vec![5, 3];
    chunks.extend(std::iter::repeat_n(1, t - 8));
    for len in chunks {
        let step: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| r[start..start + len].to_vec())
            .collect();
        let mask = Tensor::ones((2, start + len), DType::U32, &Device::Cpu).unwrap();
        let hidden = net.forward_cached(&ids(&step), &mask, &mut cache).unwrap();
        let got = logits(net, &hidden);
        let want = full.narrow(1, start, len).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(
            d <= 1e-4,
            "{spec}: positions {start}..{}: max |Δlogit| {d}",
            start + len
        );
        start += len;
    }
    assert_eq!(cache.len(), t);
}

#[test]
fn kv_cache_matches_full_forward_gpt2() {
    check_cache_matches_full_forward("builtin:tiny-gpt2", 16);
    check_cache_matches_full_forward(&fixture("gpt2-random"), 12);
}

#[test]
fn kv_cache_matches_full_forward_gpt_neox() {
    for name in ["gpt-neox-parallel", "gpt-neox-sequential"] {
        check_cache_matches_full_forward(&fixture(name), 12);
    }
}

#[test]
fn kv_cache_matches_full_forward_mistral_and_llama() {
    // sliding_window 3 in the mistral-window fixtures, so 12 tokens cross it several times.
    for name in [
        "mistral-window-untied",
        "mistral-window-tied",
        "llama-bias-headdim",
    ] {
        check_cache_matches_full_forward(&fixture(name), 12);
    }
}

/// A left-padded row's logits at its real tokens equal the same tokens' logits alone.
fn check_left_padding(spec: &str) {
    let model = load(spec);
    let net = model.net.as_ref();
    let vocab = net.output_layer().vocab_size().unwrap() as u32;
    let short: Vec<u32> = vec![3 % vocab, 7 % vocab, 1];
    let long: Vec<u32> = (0..7).map(|i| (i * 5 + 2) % vocab).collect();
    let padded = vec![[vec![0; 4], short.clone()].concat(), long.clone()];
    let mask = Tensor::new(
        vec![[vec![0u32; 4], vec![1; 3]].concat(), vec![1u32; 7]],
        &Device::Cpu,
    )
    .unwrap();
    let batch = logits(
        net,
        &net.forward_cached(&ids(&padded), &mask, &mut KvCache::new())
            .unwrap(),
    );
    for (r, (row, pad)) in [(short, 4), (long, 0)].into_iter().enumerate() {
        let alone = logits(
            net,
            &net.forward_hidden(&ids(std::slice::from_ref(&row)))
                .unwrap(),
        );
        let got = batch
            .narrow(0, r, 1)
            .unwrap()
            .narrow(1, pad, row.len())
            .unwrap();
        let d = max_abs_diff(&got, &alone);
        assert!(d <= 1e-4, "{spec}: row {r}: max |Δlogit| {d}");
    }
}

#[test]
fn left_padded_rows_match_unpadded_rows() {
    check_left_padding("builtin:tiny-gpt2");
    check_left_padding(&fixture("gpt-neox-parallel"));
    check_left_padding(&fixture("mistral-window-untied"));
}

#[test]
fn batched_greedy_generation_equals_one_prompt_at_a_time() {
    for spec in [
        "builtin:tiny-gpt2".to_string(),
        fixture("gpt-neox-sequential"),
        fixture("mistral-window-untied"),
    ] {
        let model = load(&spec);
        let net = model.net.as_ref();
        let vocab = net.output_layer().vocab_size().unwrap() as u32;
        let prompts: Vec<Vec<u32>> = vec![
            vec![5, 9, 2],
            (1..9).map(|i| (i * 3) % vocab).collect(),
            vec![7],
            vec![4, 4, 8, 1, 6],
        ];
        let greedy = Sampling::greedy(12);
        // No EOS, so every row runs the full length and the batch keeps decoding finished rows.
        let batched = generate_batch(
            &model,
            &prompts,
            &[0, 1, 2, 3],
            None,
            0,
            &greedy,
            &Device::Cpu,
        )
        .unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let alone = generate_batch(
                &model,
                std::slice::from_ref(p),
                &[i as u64],
                None,
                0,
                &greedy,
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(batched[i], alone[0], "{spec}: prompt {i}");
            assert_eq!(alone[0].tokens.len(), 12);
            assert_eq!(alone[0].finish, Finish::Length);
        }
    }
}

#[test]
fn generation_stops_each_row_at_eos() {
    let model = load("builtin:tiny-gpt2");
    let prompts = vec![vec![5u32, 9, 2], vec![3u32]];
    let free = generate_batch(
        &model,
        &prompts,
        &[0, 1],
        None,
        0,
        &Sampling::greedy(6),
        &Device::Cpu,
    )
    .unwrap();
    // Whatever the first row decodes second becomes its EOS: it must stop there, the other row
    // must not (unless it produces the same token).
    let eos = free[0].tokens[1];
    let stopped = generate_batch(
        &model,
        &prompts,
        &[0, 1],
        Some(eos),
        0,
        &Sampling::greedy(6),
        &Device::Cpu,
    )
    .unwrap();
    let first_eos = free[0].tokens.iter().position(|&t| t == eos).unwrap();
    assert_eq!(stopped[0].tokens, free[0].tokens[..first_eos]);
    assert_eq!(stopped[0].finish, Finish::Eos);
    match free[1].tokens.iter().position(|&t| t == eos) {
        Some(at) => assert_eq!(stopped[1].tokens, free[1].tokens[..at]),
        None => assert_eq!(stopped[1], free[1]),
    }
}

#[test]
fn sampling_is_reproducible_from_its_seed() {
    let model = load("builtin:tiny-gpt2");
    let prompts = vec![vec![5u32, 9, 2], vec![3u32, 1]];
    let run = |seed: u64, top_k: Option<usize>, top_p: Option<f64>| {
        let s = Sampling {
            temperature: 1.5,
            top_k,
            top_p,
            seed,
            max_new_tokens: 24,
        };
        generate_batch(&model, &prompts, &[0, 1], None, 0, &s, &Device::Cpu).unwrap()
    };
    assert_eq!(run(1, None, None), run(1, None, None));
    assert_ne!(run(1, None, None), run(2, None, None));
    assert_eq!(run(3, Some(5), Some(0.9)), run(3, Some(5), Some(0.9)));
    // A row draws from its own stream: the same alone as in the batch.
    let s = Sampling {
        temperature: 1.5,
        top_k: None,
        top_p: None,
        seed: 1,
        max_new_tokens: 24,
    };
    let alone = generate_batch(&model, &prompts[1..], &[1], None, 0, &s, &Device::Cpu).unwrap();
    assert_eq!(alone[0], run(1, None, None)[1]);
    // top-k 1 is greedy whatever the seed.
    let greedy = generate_batch(
        &model,
        &prompts,
        &[0, 1],
        None,
        0,
        &Sampling::greedy(24),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(run(4, Some(1), None), greedy);
    assert_eq!(run(5, None, Some(1e-9)), greedy);
}

#[test]
fn top_k_and_top_p_only_draw_from_the_kept_tokens() {
    let logits = [0.0f32, 3.0, 2.9, -1.0, 2.0];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let with = |top_k, top_p| Sampling {
        temperature: 1.0,
        top_k,
        top_p,
        seed: 0,
        max_new_tokens: 1,
    };
    for _ in 0..200 {
        let k = sample(&logits, &with(Some(2), None), &mut rng).unwrap();
        assert!(k == 1 || k == 2, "top-k 2 drew {k}");
        // softmax: 0.42, 0.38, 0.15, …: top-p 0.5 keeps tokens 1 and 2 only.
        let p = sample(&logits, &with(None, Some(0.5)), &mut rng).unwrap();
        assert!(p == 1 || p == 2, "top-p 0.5 drew {p}");
    }
    let greedy = Sampling::greedy(1);
    assert_eq!(sample(&logits, &greedy, &mut rng).unwrap(), 1);
    assert!(sample(&[f32::NAN, 1.0], &greedy, &mut rng).is_err());
}

/// Decodes a model's output with its tokenizer, skipping special tokens as the reference does.
fn decode(dir: &Path, ids: &[u32]) -> String {
    let tok = dpo_sam::tokenizer::Tok::from_dir(dir).unwrap();
    tok.inner.decode(ids, true).unwrap()
}

#[test]
fn stories260k_greedy_decoding_reproduces_the_published_text() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/stories260K");
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/README.md");
    if !dir.is_dir() || !readme.is_file() {
        eprintln!("skipped: ../shared/models/stories260K or ../shared/README.md is absent");
        return;
    }
    let readme = std::fs::read_to_string(readme).unwrap();
    let quoted = readme
        .split("for 60 tokens gives: \"")
        .nth(1)
        .and_then(|s| s.split("\". ").next())
        .unwrap();
    let expected = quoted.replace("\\n", "\n");
    let model = load(dir.to_str().unwrap());
    let tok = dpo_sam::tokenizer::Tok::from_dir(&dir).unwrap();
    // The model ends stories with <s>, but the tokenizer's EOS is </s>: only that one stops it.
    assert_eq!(tok.eos_id, 2);
    let prompt = tok.encode("Once upon a time").unwrap();
    assert_eq!(prompt[0], 1, "the tokenizer adds BOS <s>");
    let out = generate_batch(
        &model,
        std::slice::from_ref(&prompt),
        &[0],
        Some(tok.eos_id),
        0,
        &Sampling::greedy(60),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(out[0].tokens.len(), 60);
    let text = decode(&dir, &[prompt, out[0].tokens.clone()].concat());
    assert_eq!(text, expected);
    // The same through the CLI, with the prompt given as text.
    let out_dir = tempfile::tempdir().unwrap();
    let file = out_dir.path().join("gen.jsonl");
    let run = Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
        ])
        .args([
            "--preset",
            "hh",
            "--max-new-tokens",
            "60",
            "--out",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&file).unwrap().trim()).unwrap();
    let both = format!(
        "{}{}",
        line["prompt"].as_str().unwrap(),
        line["completion"].as_str().unwrap()
    );
    assert_eq!(both, expected);
    assert!(String::from_utf8_lossy(&run.stderr).contains("tokens/s"));
}

#[test]
fn cli_writes_prompts_of_a_preference_file_for_eval() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hh.jsonl");
    let rows = [
        serde_json::json!({"chosen": "\n\nHuman: 1+1?\n\nAssistant: 2", "rejected": "\n\nHuman: 1+1?\n\nAssistant: 3"}),
        // Same prompt again: skipped.
        serde_json::json!({"chosen": "\n\nHuman: 1+1?\n\nAssistant: two", "rejected": "\n\nHuman: 1+1?\n\nAssistant: 3"}),
        serde_json::json!({"id": "q7", "prompt": "2+2=", "chosen": "4", "rejected": "4"}),
        serde_json::json!({"prompt": "3+3="}),
        serde_json::json!({"chosen": 5}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("sub/gen.jsonl");
    let run = Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .args([
            "generate",
            "--model",
            "builtin:tiny-gpt2",
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--preset",
            "tldr",
            "--top-k",
            "5",
            "--seed",
            "3",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "2",
        ])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("tokens/s") && stderr.contains("repeated_prompt 1"),
        "{stderr}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let prompts: Vec<&str> = lines
        .iter()
        .map(|l| l["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(prompts, ["\n\nHuman: 1+1?\n\nAssistant:", "2+2=", "3+3="]);
    assert_eq!(lines[0]["id"], "hh.jsonl:1");
    assert_eq!(lines[1]["id"], "q7");
    for l in &lines {
        assert_eq!(l["settings"]["temperature"], 1.0);
        assert_eq!(l["settings"]["top_k"], 5);
        assert_eq!(l["settings"]["preset"], "tldr");
        let n = l["completion_tokens"].as_u64().unwrap();
        assert!(n <= 4 && l["prompt_tokens"].as_u64().unwrap() > 0);
        assert!(l["completion"].is_string());
    }
    // `eval` reads the file as a policy's generations.
    let cmp = dir.path().join("cmp.jsonl");
    let judge = Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .args([
            "eval",
            "--judge",
            "--task",
            "hh",
            "--policy",
            out.to_str().unwrap(),
        ])
        .args([
            "--baseline",
            out.to_str().unwrap(),
            "--comparisons",
            cmp.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        judge.status.success(),
        "{}",
        String::from_utf8_lossy(&judge.stderr)
    );
}

#[test]
fn cli_rejects_bad_settings_without_panicking() {
    let cases: [(&[&str], &str); 4] = [
        (&["--temperature=-1"], "--temperature"),
        (&["--top-p", "1.5"], "--top-p"),
        (&["--batch-size", "0"], "--batch-size"),
        (&["--data", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
    ];
    for (extra, expected) in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dpo-sam"));
        cmd.args(["generate", "--model", "builtin:tiny-gpt2"]);
        if !extra.contains(&"--data") {
            cmd.args(["--prompt", "1+1="]);
        }
        let run = cmd.args(extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(expected) && !stderr.contains("panicked"),
            "{extra:?}: {stderr}"
        );
    }
}

/// New tokens stop where the batch reaches the model's context (GPT-2's `n_positions`): finish
/// `length`, and no tokens where the prompts fill it, rather than an error mid-way.
#[test]
fn generation_stops_at_the_context_limit() {
    let model = load("builtin:tiny-gpt2");
    let limit = dpo_sam::decode::context_limit(&model.config_json).expect("n_positions");
    let long = |n: usize| (0..n).map(|i| (i % 40) as u32 + 1).collect::<Vec<u32>>();
    let prompts = [long(limit - 3), long(limit), vec![7]];
    let out = generate_batch(
        &model,
        &prompts[..1],
        &[0],
        None,
        0,
        &Sampling::greedy(12),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(out[0].tokens.len(), 3);
    assert_eq!(out[0].finish, Finish::Length);
    // The longest prompt of a batch sets the budget of every row.
    let out = generate_batch(
        &model,
        &prompts[1..],
        &[1, 2],
        None,
        0,
        &Sampling::greedy(12),
        &Device::Cpu,
    )
    .unwrap();
    assert!(out
        .iter()
        .all(|c| c.tokens.is_empty() && c.finish == Finish::Length));
}
