//! The model card every saved model directory gets (`README.md`, checkpoints included): Hugging
//! Face's YAML metadata (`base_model`, `datasets`, `library_name`, `tags`, and the base model's
//! `license` when its own card gives one), what the model is and how it was trained, the
//! training hyper-parameters, the latest train and eval metrics, how to load it, and the full
//! configuration.

use crate::config::{Config, LossType, SamKind};
use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

/// Marks a card as written here, so that `dpo-sam push` may point its loading snippet at the
/// repository it uploads to.
pub const MARKER: &str = "<!-- dpo-sam model card -->";

/// What a card says.
pub struct Card<'a> {
    pub config: &'a Config,
    /// Optimiser steps done, and planned.
    pub step: usize,
    pub total_steps: usize,
    /// The newest training and evaluation lines of `metrics.jsonl` (JSON objects).
    pub train: Option<&'a Value>,
    pub eval: Option<&'a Value>,
    /// The base model's license lines (`license`, `license_name`, `license_link`), verbatim.
    pub license: &'a [(String, String)],
}

/// The license lines of the base model's card (`README.md` in its directory, or in its Hub
/// repo through the cache): `license` and, for `license: other`, `license_name` and
/// `license_link`. Empty when there is no card or it names no license.
pub fn base_license(name_or_path: &str) -> Vec<(String, String)> {
    let path = if Path::new(name_or_path).is_dir() {
        Some(Path::new(name_or_path).join("README.md"))
    } else if crate::hub::looks_like_repo_id(name_or_path) {
        crate::hub::HubRepo::model(name_or_path).get_optional("README.md")
    } else {
        None
    };
    let text = path
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    front_matter(&text)
        .into_iter()
        .filter(|(k, _)| matches!(k.as_str(), "license" | "license_name" | "license_link"))
        .collect()
}

/// Top-level `key: value` lines of a card's YAML front matter (values as written).
fn front_matter(text: &str) -> Vec<(String, String)> {
    let mut lines = text.lines();
    if lines.next().map(str::trim_end) != Some("---") {
        return Vec::new();
    }
    lines
        .take_while(|l| l.trim_end() != "---")
        .filter(|l| !l.starts_with([' ', '\t', '-', '#']))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

/// The newest training line (one with `loss`) and evaluation line (`eval_loss`) of a
/// `metrics.jsonl`; `None` for what is missing (no file yet, no evaluation yet).
pub fn latest_metrics(metrics: &Path) -> (Option<Value>, Option<Value>) {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    let (mut train, mut eval) = (None, None);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v.get("eval_loss").is_some() {
            eval = Some(v);
        } else if v.get("loss").is_some() {
            train = Some(v);
        }
    }
    (train, eval)
}

/// The model's name: the Hub repo's when `hub_model_id` is set, else `output_dir`'s.
fn model_name(cfg: &Config) -> String {
    match &cfg.training.hub_model_id {
        Some(id) => id.rsplit('/').next().unwrap_or(id).to_string(),
        None => cfg
            .output_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    }
}

/// What the model is loaded from in the card's snippets: the Hub repo when known, else the
/// directory ([`with_repo_id`] changes it when the directory is pushed).
fn model_id(cfg: &Config) -> String {
    match &cfg.training.hub_model_id {
        Some(id) if id.contains('/') => id.clone(),
        _ => cfg.output_dir.display().to_string(),
    }
}

/// Tags: the tool, the loss family, and SAM.
fn tags(cfg: &Config) -> Vec<&'static str> {
    let mut tags = vec!["dpo-sam"];
    for (kind, _) in cfg.loss_terms() {
        let tag = match kind {
            LossType::Sigmoid | LossType::Hinge | LossType::Robust => "dpo",
            LossType::Ipo => "ipo",
            LossType::Slic => "slic-hf",
            LossType::Cpo => "cpo",
            LossType::Simpo => "simpo",
            LossType::Dpop => "dpop",
            LossType::Sft => "sft",
        };
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    if cfg.lora_enabled() {
        tags.push("lora");
    }
    match cfg.sam.kind {
        SamKind::Logits => tags.push("logits-sam"),
        SamKind::Full => tags.push("sam"),
        SamKind::None => {}
    }
    tags
}

/// A YAML scalar: JSON's string syntax is valid YAML.
fn yaml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A metric value as [`short_number`] writes it, with four significant digits.
fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => short_number(x, 3),
        None => v.to_string(),
    }
}

/// Plain with up to four decimals for moderate magnitudes, else scientific with `decimals`
/// (the card's tables and the report's tick labels).
pub fn short_number(x: f64, decimals: usize) -> String {
    if x == 0.0 || (1e-3..1e5).contains(&x.abs()) {
        let s = format!("{x:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{x:.decimals$e}")
    }
}

/// The card of a `dpo-sam merge` output: the base model, the adapter folded into it, how to
/// load it.
pub fn merged(base: &str, adapter: &Path) -> String {
    format!(
        "---\nbase_model: {}\nlibrary_name: transformers\ntags:\n- dpo-sam\n- lora\n- merged\n---\n\
         {MARKER}\n\n# {base} with a merged LoRA adapter\n\n\
         The LoRA adapter `{}` folded into `{base}` by `dpo-sam merge`: each adapted weight is \
         W + s·BA, as PEFT's `merge_and_unload` leaves it, so no `peft` is needed to load it.\n\n\
         ```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
         tokenizer = AutoTokenizer.from_pretrained(\"<this directory>\")\n\
         model = AutoModelForCausalLM.from_pretrained(\"<this directory>\")\n```\n",
        yaml_str(base),
        adapter.display()
    )
}

pub fn render(card: &Card) -> String {
    let cfg = card.config;
    let t = &cfg.training;
    let base = &cfg.model.name_or_path;
    let base_is_hub = crate::hub::looks_like_repo_id(base);
    let base_id = base.split('@').next().unwrap_or(base);
    let mut datasets: Vec<String> = Vec::new();
    let sources = cfg.data.train.paths().into_iter().chain(
        cfg.data
            .eval
            .iter()
            .flat_map(|e| e.paths())
            .collect::<Vec<_>>(),
    );
    for spec in sources {
        if let Some(id) = crate::data::source::hub_dataset_id(spec) {
            if !datasets.contains(&id) {
                datasets.push(id);
            }
        }
    }
    let name = model_name(cfg);

    let mut s = String::from("---\n");
    if base_is_hub {
        writeln!(s, "base_model: {}", yaml_str(base_id)).unwrap();
    }
    if !datasets.is_empty() {
        s.push_str("datasets:\n");
        for d in &datasets {
            writeln!(s, "- {}", yaml_str(d)).unwrap();
        }
    }
    // A LoRA run saves a PEFT adapter.
    let library = match cfg.lora_enabled() {
        true => "peft",
        false => "transformers",
    };
    writeln!(s, "library_name: {library}").unwrap();
    for (k, v) in card.license {
        writeln!(s, "{k}: {v}").unwrap();
    }
    writeln!(s, "model_name: {}", yaml_str(&name)).unwrap();
    s.push_str("tags:\n");
    for tag in tags(cfg) {
        writeln!(s, "- {tag}").unwrap();
    }
    s.push_str("---\n");
    writeln!(s, "{MARKER}\n\n# {name}\n").unwrap();

    // What it is.
    let losses: Vec<String> = cfg
        .loss_terms()
        .iter()
        .map(|(k, w)| match *w == 1.0 {
            true => format!("`{k}`"),
            false => format!("{w} × `{k}`"),
        })
        .collect();
    let base_text = if base_is_hub {
        format!("[{base_id}](https://huggingface.co/{base_id})")
    } else {
        format!("`{base}`")
    };
    let data_text = match datasets.is_empty() {
        true => format!("`{}`", cfg.data.train.paths().join("`, `")),
        false => datasets
            .iter()
            .map(|d| format!("[{d}](https://huggingface.co/datasets/{d})"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    let sam = match cfg.sam.kind {
        SamKind::None => String::new(),
        SamKind::Logits => format!(
            " and logits-SAM (SAM on the output layer only, ρ = {}{})",
            cfg.sam.rho,
            if cfg.sam.adaptive { ", adaptive" } else { "" }
        ),
        SamKind::Full => format!(" and SAM on every parameter (ρ = {})", cfg.sam.rho),
    };
    writeln!(
        s,
        "A fine-tune of {base_text} on {data_text} by preference optimisation with the {} loss \
         (β = {}){sam}, trained with dpo-sam.\n",
        losses.join(" + "),
        t.beta
    )
    .unwrap();
    match card.step >= card.total_steps {
        true => writeln!(
            s,
            "Training finished after {} optimiser steps.\n",
            card.step
        ),
        false => writeln!(
            s,
            "A checkpoint after {} of {} optimiser steps.\n",
            card.step, card.total_steps
        ),
    }
    .unwrap();

    // How to load.
    let id = model_id(cfg);
    let (import, class) = match cfg.lora_enabled() {
        true => (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer",
            "AutoPeftModelForCausalLM",
        ),
        false => (
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "AutoModelForCausalLM",
        ),
    };
    writeln!(s, "## How to load\n\n```python\n{import}\n").unwrap();
    writeln!(s, "model_id = {}", yaml_str(&id)).unwrap();
    writeln!(
        s,
        "tokenizer = AutoTokenizer.from_pretrained(model_id)\n\
         model = {class}.from_pretrained(model_id)\n```\n\n\
         or generate with dpo-sam itself:\n\n```sh"
    )
    .unwrap();
    writeln!(
        s,
        "dpo-sam generate --model {id} --prompt \"Hello\" --max-new-tokens 64\n```\n"
    )
    .unwrap();

    // Hyper-parameters.
    s.push_str("## Training hyper-parameters\n\n| key | value |\n|---|---|\n");
    let steps = match t.max_steps {
        Some(n) => format!("{n}"),
        None => format!("{} epochs ({} steps)", t.num_train_epochs, card.total_steps),
    };
    let warmup = match t.warmup_steps {
        0 => format!("ratio {}", t.warmup_ratio),
        n => format!("{n} steps"),
    };
    let rows: Vec<(&str, String)> = vec![
        (
            "loss_type",
            cfg.loss_terms()
                .iter()
                .map(|(k, w)| format!("{k} × {w}"))
                .collect::<Vec<_>>()
                .join(" + "),
        ),
        ("beta", t.beta.to_string()),
        ("learning_rate", t.learning_rate.to_string()),
        ("lr_scheduler_type", t.lr_scheduler_type.to_string()),
        ("warmup", warmup),
        ("batch_size (pairs per step)", t.batch_size.to_string()),
        ("micro_batch_size", cfg.micro_batch_size().to_string()),
        ("max_steps", steps),
        ("optimizer", t.optimizer.to_string()),
        ("weight_decay", t.weight_decay.to_string()),
        (
            "adam_beta1, adam_beta2, adam_epsilon",
            format!("{}, {}, {}", t.adam_beta1, t.adam_beta2, t.adam_epsilon),
        ),
        ("max_grad_norm", t.max_grad_norm.to_string()),
        ("sam.kind", cfg.sam.kind.to_string()),
        ("sam.rho", cfg.sam.rho.to_string()),
        ("sam.adaptive", cfg.sam.adaptive.to_string()),
        ("model.dtype", cfg.model.dtype.to_string()),
        ("mixed_precision", t.mixed_precision.to_string()),
        ("data.max_length", cfg.data.max_length.to_string()),
        (
            "data.max_prompt_length",
            cfg.data
                .max_prompt_length
                .map_or("none".into(), |n| n.to_string()),
        ),
        ("seed", cfg.seed.to_string()),
    ];
    for (k, v) in rows {
        writeln!(s, "| {k} | {v} |").unwrap();
    }

    // Metrics.
    s.push_str("\n## Results\n\n");
    let at = |v: Option<&Value>| v.and_then(|v| v.get("step")).map(number);
    match (card.train, card.eval) {
        (None, None) => s.push_str("No metrics were logged before this save.\n"),
        (train, eval) => {
            writeln!(
                s,
                "| metric | train (step {}) | eval (step {}) |\n|---|---:|---:|",
                at(train).unwrap_or("–".into()),
                at(eval).unwrap_or("–".into())
            )
            .unwrap();
            let mut keys: Vec<String> = Vec::new();
            let train_keys = train.and_then(Value::as_object).into_iter().flatten();
            let eval_keys = eval.and_then(Value::as_object).into_iter().flatten();
            for (k, v) in train_keys.chain(eval_keys) {
                let k = k.strip_prefix("eval_").unwrap_or(k);
                if v.is_number() && k != "step" && !keys.iter().any(|x| x == k) {
                    keys.push(k.to_string());
                }
            }
            keys.sort();
            let cell = |line: Option<&Value>, key: &str| {
                line.and_then(|l| l.get(key))
                    .filter(|v| v.is_number())
                    .map_or("".into(), number)
            };
            for k in keys {
                writeln!(
                    s,
                    "| {k} | {} | {} |",
                    cell(train, &k),
                    cell(eval, &format!("eval_{k}"))
                )
                .unwrap();
            }
        }
    }
    s.push_str(
        "\nRewards are β × (policy − reference) log-probabilities of the chosen and rejected \
         responses; `squeeze/*` are the squeezing-effect diagnostics of the logits-SAM paper \
         (see dpo-sam's README).\n",
    );

    // The whole configuration.
    let toml = toml::to_string(cfg).unwrap_or_else(|e| format!("# not serialisable: {e}"));
    writeln!(
        s,
        "\n## Configuration\n\n<details><summary>The dpo-sam run configuration</summary>\n\n```toml\n{}\n```\n\n</details>\n",
        toml.trim_end()
    )
    .unwrap();
    s.push_str(
        "## Citation\n\nlogits-SAM: *Sharpness-Aware Minimization in Logit Space Efficiently \
         Enhances Direct Preference Optimization*. DPO: Rafailov et al., *Direct Preference \
         Optimization: Your Language Model is Secretly a Reward Model*, NeurIPS 2023.\n",
    );
    s
}

/// A dpo-sam card with its loading snippets pointed at `repo_id` (what `push` uploads; the
/// local file stays as it is). Other cards are returned unchanged.
pub fn with_repo_id(card: &str, repo_id: &str) -> String {
    if !card.contains(MARKER) {
        return card.to_string();
    }
    let mut out = String::with_capacity(card.len());
    for line in card.lines() {
        if line.starts_with("model_id = ") {
            writeln!(out, "model_id = {}", yaml_str(repo_id)).unwrap();
        } else if let Some(rest) = line.strip_prefix("dpo-sam generate --model ") {
            let tail = rest.split_once(' ').map_or("", |(_, t)| t);
            writeln!(out, "dpo-sam generate --model {repo_id} {tail}").unwrap();
        } else {
            writeln!(out, "{line}").unwrap();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(overrides: &[&str]) -> Config {
        let text = r#"
output_dir = "runs/hh-logits"
[model]
name_or_path = "EleutherAI/pythia-2.8b"
[data]
train = "hub:Anthropic/hh-rlhf:train"
eval = "hub:Anthropic/hh-rlhf:test"
[training]
learning_rate = 1e-6
batch_size = 64
[sam]
kind = "logits"
rho = 1e-4
"#;
        let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::parse(text, "card.toml", &ov).unwrap()
    }

    #[test]
    fn card_has_hub_metadata_hyperparameters_metrics_and_loading() {
        let cfg = config(&[]);
        let train = serde_json::json!({"loss": 0.61234, "rewards/accuracies": 0.75, "step": 40, "epoch": 0.5});
        let eval =
            serde_json::json!({"eval_loss": 0.65, "eval_rewards/accuracies": 0.7, "step": 40});
        let license = vec![("license".to_string(), "apache-2.0".to_string())];
        let text = render(&Card {
            config: &cfg,
            step: 40,
            total_steps: 100,
            train: Some(&train),
            eval: Some(&eval),
            license: &license,
        });
        let (yaml, body) = text
            .strip_prefix("---\n")
            .unwrap()
            .split_once("---\n")
            .unwrap();
        for want in [
            "base_model: \"EleutherAI/pythia-2.8b\"",
            "datasets:\n- \"Anthropic/hh-rlhf\"\n",
            "library_name: transformers",
            "license: apache-2.0",
            "- dpo\n",
            "- logits-sam\n",
        ] {
            assert!(yaml.contains(want), "{want} missing from\n{yaml}");
        }
        for want in [
            "A checkpoint after 40 of 100 optimiser steps",
            "| learning_rate | 0.000001 |",
            "| sam.rho | 0.0001 |",
            "| loss | 0.6123 | 0.65 |",
            "| rewards/accuracies | 0.75 | 0.7 |",
            "| metric | train (step 40) | eval (step 40) |",
            "model_id = \"runs/hh-logits\"",
            "AutoModelForCausalLM.from_pretrained(model_id)",
            "rho = 0.0001",
        ] {
            assert!(body.contains(want), "{want} missing from\n{body}");
        }
        let pushed = with_repo_id(&text, "me/hh-logits");
        assert!(pushed.contains("model_id = \"me/hh-logits\""));
        assert!(pushed.contains("dpo-sam generate --model me/hh-logits --prompt"));
        // The config section still names the local output_dir; the snippets do not.
        assert!(!pushed.contains("model_id = \"runs/hh-logits\""));
        assert!(!pushed.contains("--model runs/hh-logits"));
        assert_eq!(
            with_repo_id("# someone else's card\nmodel_id = 1\n", "x/y"),
            "# someone else's card\nmodel_id = 1\n"
        );
    }

    #[test]
    fn license_lines_come_from_the_base_cards_front_matter() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("README.md"),
            "---\nlanguage:\n- en\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\ntags:\n- x\n---\n# M\nlicense: not this\n",
        )
        .unwrap();
        let got = base_license(dir.path().to_str().unwrap());
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["license", "license_name", "license_link"]);
        assert_eq!(got[0].1, "other");
        std::fs::write(
            dir.path().join("README.md"),
            "# no front matter\nlicense: mit\n",
        )
        .unwrap();
        assert!(base_license(dir.path().to_str().unwrap()).is_empty());
        assert!(base_license("builtin:tiny-gpt2").is_empty());
    }
}
