//! `data.filter_ches_quantile` in the trainer on the built-in tiny GPT-2: it drops exactly the
//! pairs with the highest length-normalised CHES under the starting policy, caches the scores
//! beside the run (used again, and recomputed when the file is bad), and a resumed run trains on
//! the same pairs to the same weights.

use dpo_sam::data::ches::ches_scores;
use dpo_sam::train::{Summary, Trainer};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

mod common;
use common::tiny_config;

fn trainer(out: &Path, extra: &[&str]) -> Trainer {
    let mut ov = vec![format!("output_dir=\"{}\"", out.display())];
    ov.extend(extra.iter().map(|s| s.to_string()));
    let ov: Vec<&str> = ov.iter().map(String::as_str).collect();
    Trainer::new(tiny_config(&ov).unwrap()).unwrap()
}

fn ches_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("ches-") && name.ends_with(".safetensors")
        })
        .collect()
}

fn ches_file(dir: &Path) -> PathBuf {
    let files = ches_files(dir);
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

#[test]
fn the_filter_drops_the_most_displacement_prone_pairs_and_caches_their_scores() {
    let dir = tempfile::tempdir().unwrap();
    let all = trainer(&dir.path().join("all"), &[]);
    let pairs = all.train_pairs().to_vec();
    let scores = ches_scores(all.policy(), &pairs, 3, all.tok().pad_id, all.device()).unwrap();
    let mut ranked: Vec<usize> = (0..pairs.len()).collect();
    ranked.sort_by(|&a, &b| scores[b].ln_ches.total_cmp(&scores[a].ln_ches));
    let drop = pairs.len() / 4;
    let expected: Vec<_> = (0..pairs.len())
        .filter(|i| !ranked[..drop].contains(i))
        .map(|i| pairs[i].clone())
        .collect();

    let out = dir.path().join("filtered");
    let q = "data.filter_ches_quantile=0.25";
    let filtered = trainer(&out, &[q]);
    assert_eq!(drop, 16, "64 pairs, a quarter dropped");
    assert_eq!(filtered.train_pairs(), expected.as_slice());
    assert_eq!(
        filtered.eval_pairs(),
        all.eval_pairs(),
        "eval pairs untouched"
    );

    // The scores are cached beside the run and read back, not recomputed and rewritten.
    let cache = ches_file(&out);
    let inode = std::fs::metadata(&cache).unwrap().ino();
    let again = trainer(&out, &[q]);
    assert_eq!(again.train_pairs(), expected.as_slice());
    assert_eq!(std::fs::metadata(&cache).unwrap().ino(), inode);
    // A bad file is reported, recomputed and replaced.
    std::fs::write(&cache, b"not safetensors").unwrap();
    let again = trainer(&out, &[q]);
    assert_eq!(again.train_pairs(), expected.as_slice());
    assert_ne!(std::fs::read(&cache).unwrap(), b"not safetensors");
}

#[test]
fn a_filtered_run_resumes_on_the_same_pairs_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let set = [
        "data.filter_ches_quantile=0.5",
        "training.max_steps=4",
        "training.eval_steps=0",
    ];
    let mut whole = trainer(&dir.path().join("whole"), &set);
    whole.train().unwrap();

    // Stopped after its first step (as by Ctrl-C), then resumed by a fresh trainer.
    let out = dir.path().join("resumed");
    let mut first = trainer(&out, &set);
    first
        .stop_flag()
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let Summary::Interrupted { checkpoint, .. } = first.train().unwrap() else {
        panic!("the stop flag ends the run after one step");
    };
    let mut resumed = trainer(&out, &set);
    assert_eq!(resumed.train_pairs(), whole.train_pairs());
    resumed.restore(&checkpoint).unwrap();
    resumed.train().unwrap();
    let (a, b) = (
        whole.policy().named_tensors(),
        resumed.policy().named_tensors(),
    );
    for (name, t) in &a {
        let diff = common::max_abs_diff(t, &b[name]);
        assert_eq!(diff, 0.0, "{name} differs after resuming");
    }
}

/// The scores are the policy's as loaded: with `model.adapter`, base + adapter, so a cache made
/// for the base alone is not theirs.
#[test]
fn the_cache_is_keyed_by_the_starting_adapter() {
    let fixture = |name: &str| format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let base = format!("model.name_or_path=\"{}\"", fixture("gpt2-random"));
    let adapter = format!("model.adapter=\"{}\"", fixture("peft-gpt2-random"));
    let q = "data.filter_ches_quantile=0.25";
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    trainer(&out, &[&base, q]);
    let for_base = ches_file(&out);
    let started = trainer(&out, &[&base, &adapter, q]);
    let files = ches_files(&out);
    assert_eq!(
        files.len(),
        2,
        "a second cache, for base + adapter: {files:?}"
    );
    assert!(files.contains(&for_base));
    // And its pairs are those base + adapter's scores keep.
    let all = trainer(&dir.path().join("all"), &[&base, &adapter]);
    let pairs = all.train_pairs().to_vec();
    let scores = ches_scores(all.policy(), &pairs, 3, all.tok().pad_id, all.device()).unwrap();
    let ln: Vec<f64> = scores.iter().map(|c| c.ln_ches).collect();
    let (keep, _) = dpo_sam::data::ches::filter_mask(&ln, 0.25);
    let expected: Vec<_> = pairs
        .into_iter()
        .zip(keep)
        .filter_map(|(p, k)| k.then_some(p))
        .collect();
    assert_eq!(started.train_pairs(), expected.as_slice());
}
