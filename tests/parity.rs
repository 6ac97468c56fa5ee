//! Parity with `transformers`: each fixture under tests/fixtures (written by
//! scripts/make_fixtures.py) holds a tiny model and the logits and log-prob sums that
//! `transformers` computed for it; the models built here must reproduce them. Also checks that
//! every weight of every architecture receives a gradient, since candle's fused ops would drop
//! gradients silently. And that what `dpo-sam` saves (sharded, any dtype) loads back exactly,
//! keeps parity, and loads into candle-transformers.

use candle_core::{DType, Device, Tensor, D};
use dpo_sam::checkpoint::{save_weights, SaveOptions};
use dpo_sam::models::ops::log_softmax_last_dim;
use dpo_sam::models::{weight_files, Model, ModelSource, SUPPORTED};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The shared pretrained model `name`, or `None` (with the reason printed) when absent.
fn shared_model(name: &str) -> Option<PathBuf> {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/models")).join(name);
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipping: {} not found", dir.display());
        None
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn matrix_u32(v: &Value) -> Vec<Vec<u32>> {
    let rows = v.as_array().unwrap();
    rows.iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Max abs errors of (logits, log-sum-exp, per-sequence log-prob sums) against `expected`.
fn errors(model_dir: &Path, expected: &Value, dtype: DType) -> (f32, f32, f32) {
    let dev = Device::Cpu;
    let model = Model::load(
        &ModelSource::Dir(model_dir.to_path_buf()),
        false,
        dtype,
        &dev,
    )
    .unwrap();
    let ids = matrix_u32(&expected["input_ids"]);
    let (b, t) = (ids.len(), ids[0].len());
    let input = Tensor::new(ids.clone(), &dev).unwrap();
    let h = model.net.forward_hidden(&input).unwrap();
    let hidden = h.dim(D::Minus1).unwrap();
    let logits = model
        .net
        .output_layer()
        .logits(&h.reshape((b * t, hidden)).unwrap(), None)
        .unwrap();
    let logp = log_softmax_last_dim(&logits)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let lse: Vec<f32> = logits
        .exp()
        .unwrap()
        .sum(1)
        .unwrap()
        .log()
        .unwrap()
        .to_vec1()
        .unwrap();
    let logits = match expected["columns"].as_array() {
        Some(cols) => {
            let cols: Vec<u32> = cols.iter().map(|c| c.as_u64().unwrap() as u32).collect();
            logits
                .index_select(&Tensor::new(cols, &dev).unwrap(), 1)
                .unwrap()
        }
        None => logits,
    };
    let logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mask = matrix_u32(&expected["response_mask"]);
    let sums: Vec<f32> = (0..b)
        .map(|r| {
            (1..t)
                .filter(|&i| mask[r][i] == 1)
                .map(|i| logp[r * t + i - 1][ids[r][i] as usize])
                .sum()
        })
        .collect();
    (
        max_abs_diff(&logits, &floats(&expected["logits"])),
        max_abs_diff(&lse, &floats(&expected["logsumexp"])),
        max_abs_diff(&sums, &floats(&expected["logp_sums"])),
    )
}

fn assert_parity(name: &str, dir: &Path, expected: &Value, dtype: DType, tol: f32) {
    let (logits, lse, sums) = errors(dir, expected, dtype);
    eprintln!("{name} ({dtype:?}): max abs error logits {logits:.2e}, logsumexp {lse:.2e}, logp sums {sums:.2e}");
    assert!(
        logits <= tol,
        "{name}: logits differ from transformers by {logits}"
    );
    assert!(
        lse <= tol,
        "{name}: log-sum-exp differs from transformers by {lse}"
    );
    assert!(
        sums <= 2.0 * tol,
        "{name}: log-prob sums differ from transformers by {sums}"
    );
}

fn assert_fixture(name: &str) {
    let dir = fixture(name);
    assert_parity(
        name,
        &dir,
        &read_json(&dir.join("expected.json")),
        DType::F32,
        TOL,
    );
}

#[test]
fn gpt2_random_matches_transformers() {
    assert_fixture("gpt2-random");
}

#[test]
fn gpt_neox_parallel_residual_matches_transformers() {
    assert_fixture("gpt-neox-parallel");
}

#[test]
fn gpt_neox_sequential_residual_with_pythia_config_spelling_matches_transformers() {
    let dir = fixture("gpt-neox-sequential");
    let cfg = read_json(&dir.join("config.json"));
    assert!(cfg.get("rotary_pct").is_some() && cfg.get("rope_parameters").is_none());
    assert_fixture("gpt-neox-sequential");
}

#[test]
fn mistral_gqa_sliding_window_untied_matches_transformers() {
    assert_fixture("mistral-window-untied");
}

#[test]
fn mistral_gqa_sliding_window_tied_matches_transformers() {
    assert_fixture("mistral-window-tied");
}

#[test]
fn llama_biases_explicit_head_dim_tied_matches_transformers() {
    assert_fixture("llama-bias-headdim");
}

#[test]
fn sharded_checkpoint_loads_and_matches_transformers() {
    let files = weight_files(&fixture("mistral-sharded")).unwrap();
    assert!(files.len() > 1, "expected several shards, got {files:?}");
    assert_fixture("mistral-sharded");
}

#[test]
fn bf16_checkpoint_loads_into_f32_and_matches_transformers() {
    let dir = fixture("gpt-neox-bf16");
    let st =
        unsafe { candle_core::safetensors::MmapedSafetensors::new(dir.join("model.safetensors")) }
            .unwrap();
    assert!(st
        .tensors()
        .iter()
        .all(|(_, view)| view.dtype() == safetensors::Dtype::BF16));
    // transformers computed the expectation from the same bf16 values upcast to f32.
    assert_fixture("gpt-neox-bf16");
    // Computing in bf16 itself only approximates it.
    assert_parity(
        "gpt-neox-bf16",
        &dir,
        &read_json(&dir.join("expected.json")),
        DType::BF16,
        0.15,
    );
}

#[test]
fn shared_gpt2_fake_tiny_matches_transformers() {
    let Some(dir) = shared_model("gpt2-fake-tiny") else {
        return;
    };
    let expected = read_json(&fixture("shared-gpt2-fake-tiny-expected.json"));
    assert_parity("gpt2-fake-tiny", &dir, &expected, DType::F32, TOL);
}

#[test]
fn shared_stories260k_matches_transformers() {
    let Some(dir) = shared_model("stories260K") else {
        return;
    };
    let expected = read_json(&fixture("shared-stories260K-expected.json"));
    assert_parity("stories260K", &dir, &expected, DType::F32, TOL);
}

#[test]
fn unsupported_model_type_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    let weights = [(
        "w".to_string(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    )];
    candle_core::safetensors::save(
        &weights.into_iter().collect(),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let err = Model::load(
        &ModelSource::Dir(dir.path().to_path_buf()),
        false,
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .expect("bert must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("unsupported model_type `bert`"), "{msg}");
    for name in SUPPORTED {
        assert!(msg.contains(name), "{msg} does not list {name}");
    }
}

/// Every trainable tensor must get a non-zero gradient from the sum of token log-probs.
fn assert_all_weights_get_gradients(dir: &Path) {
    let dev = Device::Cpu;
    let model = Model::load(&ModelSource::Dir(dir.to_path_buf()), true, DType::F32, &dev).unwrap();
    assert!(!model.params.is_empty());
    let ids = matrix_u32(&read_json(&dir.join("expected.json"))["input_ids"]);
    let (b, t) = (ids.len(), ids[0].len());
    let input = Tensor::new(ids.clone(), &dev).unwrap();
    let h = model.net.forward_hidden(&input).unwrap();
    let hidden = h.dim(D::Minus1).unwrap();
    let h = h
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), hidden))
        .unwrap();
    let targets: Vec<u32> = ids.iter().flat_map(|r| r[1..].to_vec()).collect();
    let targets = Tensor::new(targets, &dev).unwrap();
    let loss = model
        .net
        .output_layer()
        .token_logps(&h, &targets, None)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for p in &model.params {
        let g = grads
            .get(&p.var)
            .unwrap_or_else(|| panic!("{}: `{}` has no gradient", dir.display(), p.name));
        let size = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            size > 0.0 && size.is_finite(),
            "{}: `{}` has gradient abs sum {size}",
            dir.display(),
            p.name
        );
    }
}

#[test]
fn every_weight_of_every_architecture_gets_a_gradient() {
    for name in FIXTURES {
        assert_all_weights_get_gradients(&fixture(name));
    }
}

/// Every committed fixture model.
const FIXTURES: &[&str] = &[
    "gpt2-random",
    "gpt-neox-parallel",
    "gpt-neox-sequential",
    "mistral-window-untied",
    "mistral-window-tied",
    "llama-bias-headdim",
    "mistral-sharded",
];

fn save_opts(dtype: Option<DType>, max_shard_size: u64) -> SaveOptions {
    SaveOptions {
        dtype,
        max_shard_size,
    }
}

/// All tensors of a model directory, whatever its sharding.
fn load_all(dir: &Path) -> HashMap<String, Tensor> {
    weight_files(dir)
        .unwrap()
        .iter()
        .flat_map(|f| candle_core::safetensors::load(f, &Device::Cpu).unwrap())
        .collect()
}

fn load_trainable(dir: &Path) -> Model {
    Model::load(
        &ModelSource::Dir(dir.to_path_buf()),
        true,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn saved_checkpoints_round_trip_exactly_sharded_and_keep_parity() {
    for name in FIXTURES {
        let src = fixture(name);
        let model = load_trainable(&src);
        let out = tempfile::tempdir().unwrap();
        // Small enough to shard every fixture.
        save_weights(&model, out.path(), &save_opts(None, 8_000)).unwrap();
        let files = weight_files(out.path()).unwrap();
        assert!(files.len() > 1, "{name}: expected shards, got {files:?}");
        assert!(!out.path().join("model.safetensors").exists());
        let index = read_json(&out.path().join("model.safetensors.index.json"));
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), model.params.len(), "{name}: weight_map entries");
        let saved = load_all(out.path());
        let mut total = 0;
        for p in &model.params {
            let t = &saved[&p.name];
            assert_eq!(t.dims(), p.var.dims(), "{name}: {}", p.name);
            assert_eq!(
                bits(t),
                bits(p.var.as_tensor()),
                "{name}: {} differs",
                p.name
            );
            total += t.elem_count() * 4;
        }
        assert_eq!(index["metadata"]["total_size"], total, "{name}");
        // Source names, and the source's config.json apart from the dtype entry.
        let mut config = read_json(&out.path().join("config.json"));
        let mut want = read_json(&src.join("config.json"));
        for c in [&mut config, &mut want] {
            let o = c.as_object_mut().unwrap();
            o.remove("dtype");
            o.remove("torch_dtype");
        }
        assert_eq!(config, want, "{name}: config.json changed");
        assert_parity(
            name,
            out.path(),
            &read_json(&src.join("expected.json")),
            DType::F32,
            TOL,
        );
    }
}

#[test]
fn bf16_save_rounds_weights_once_and_records_the_dtype() {
    let src = fixture("gpt-neox-parallel");
    let model = load_trainable(&src);
    let out = tempfile::tempdir().unwrap();
    save_weights(&model, out.path(), &save_opts(Some(DType::BF16), 1 << 30)).unwrap();
    assert_eq!(
        weight_files(out.path()).unwrap(),
        vec![out.path().join("model.safetensors")]
    );
    let saved = load_all(out.path());
    for p in &model.params {
        let t = &saved[&p.name];
        assert_eq!(t.dtype(), DType::BF16, "{}", p.name);
        let rounded = p.var.as_tensor().to_dtype(DType::BF16).unwrap();
        assert_eq!(bits(t), bits(&rounded), "{}", p.name);
    }
    let config = read_json(&out.path().join("config.json"));
    assert_eq!(config["dtype"], "bfloat16", "{config}");
    // What transformers computed for the bf16-rounded model is in the bf16 fixture, which has
    // the same architecture; here the rounded copy must load back into f32 bit for bit.
    let reloaded = load_trainable(out.path());
    for (a, b) in reloaded.params.iter().zip(&model.params) {
        assert_eq!(a.name, b.name);
        let rounded = b.var.as_tensor().to_dtype(DType::BF16).unwrap();
        assert_eq!(bits(a.var.as_tensor()), bits(&rounded), "{}", a.name);
    }
}

#[test]
fn saving_again_replaces_the_previous_layout() {
    let model = load_trainable(&fixture("mistral-window-tied"));
    let out = tempfile::tempdir().unwrap();
    save_weights(&model, out.path(), &save_opts(None, 8_000)).unwrap();
    assert!(weight_files(out.path()).unwrap().len() > 1);
    save_weights(&model, out.path(), &save_opts(None, 1 << 30)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
}

/// Last-position logits of our model loaded from `dir`, `[b, vocab]`.
fn last_logits(dir: &Path, ids: &Tensor) -> Tensor {
    let model = Model::load(
        &ModelSource::Dir(dir.to_path_buf()),
        false,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let h = model.net.forward_hidden(ids).unwrap();
    let t = h.dim(1).unwrap();
    let last = h.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
    model.net.output_layer().logits(&last, None).unwrap()
}

fn candle_var_builder(dir: &Path) -> candle_nn::VarBuilder<'static> {
    let files = weight_files(dir).unwrap();
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
        .unwrap()
}

#[test]
fn candle_transformers_mistral_loads_a_sharded_bf16_save() {
    use candle_transformers::models::mistral;
    let src = fixture("mistral-sharded");
    let out = tempfile::tempdir().unwrap();
    let model = load_trainable(&src);
    save_weights(&model, out.path(), &save_opts(Some(DType::BF16), 4_000)).unwrap();
    assert!(weight_files(out.path()).unwrap().len() > 1);
    let mut config = read_json(&out.path().join("config.json"));
    // transformers 5 writes rope_theta under rope_parameters; candle's Config reads it flat.
    config["rope_theta"] = config["rope_parameters"]["rope_theta"].clone();
    let cfg: mistral::Config = serde_json::from_value(config).unwrap();
    let mut theirs = mistral::Model::new(&cfg, candle_var_builder(out.path())).unwrap();
    let ids = Tensor::new(
        matrix_u32(&read_json(&src.join("expected.json"))["input_ids"]),
        &Device::Cpu,
    )
    .unwrap();
    let got = theirs.forward(&ids, 0).unwrap().squeeze(1).unwrap();
    let want = last_logits(out.path(), &ids);
    let diff = max_abs_diff(&floats_of(&got), &floats_of(&want));
    eprintln!("candle-transformers mistral vs dpo-sam on the saved checkpoint: {diff:.2e}");
    assert!(diff <= TOL, "logits differ by {diff}");
}

#[test]
fn candle_transformers_llama_loads_saved_stories260k() {
    use candle_transformers::models::llama;
    let Some(src) = shared_model("stories260K") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let model = load_trainable(&src);
    save_weights(&model, out.path(), &save_opts(None, 200_000)).unwrap();
    assert!(weight_files(out.path()).unwrap().len() > 1);
    let cfg: llama::LlamaConfig =
        serde_json::from_value(read_json(&out.path().join("config.json"))).unwrap();
    let cfg = cfg.into_config(false);
    let theirs = llama::Llama::load(candle_var_builder(out.path()), &cfg).unwrap();
    let mut cache = llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
    // Any ids below the vocabulary size do: the comparison is of the two implementations.
    let ids = Tensor::new(&[[1u32, 403, 407, 261, 378]], &Device::Cpu).unwrap();
    let got = theirs.forward(&ids, 0, &mut cache).unwrap();
    let want = last_logits(out.path(), &ids);
    let diff = max_abs_diff(&floats_of(&got), &floats_of(&want));
    eprintln!("candle-transformers llama vs dpo-sam on saved stories260K: {diff:.2e}");
    assert!(diff <= TOL, "logits differ by {diff}");
}

fn floats_of(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}
