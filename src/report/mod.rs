//! `dpo-sam report`: one self-contained HTML page comparing runs — which config keys differ,
//! the final train and eval metrics, every metric's curve, the squeeze diagnostics with what
//! they mean, and each run's latest evaluation samples. No network: styles inline, charts as
//! inline SVG ([`chart`]), and a few lines of script that only count the charts drawn.
//!
//! A run is an `output_dir`: `metrics.jsonl`, the config (`training_config.toml`, else the
//! newest checkpoint's `config.toml`) and, with `training.eval_generate`, `samples.jsonl`.

mod chart;

use anyhow::{bail, Context, Result};
use chart::{escape, Line, COLORS};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
#[command(after_help = "Example: dpo-sam report runs/dpo runs/dpo-sam --out report.html")]
pub struct ReportArgs {
    /// Run directories (a training's output_dir), or their metrics.jsonl files.
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html")]
    pub out: PathBuf,
    /// Name of each run, in order; once per run or not at all (default: the directory's name).
    #[arg(long = "label", value_name = "NAME")]
    pub labels: Vec<String>,
    /// The page's title.
    #[arg(long, default_value = "dpo-sam runs")]
    pub title: String,
}

/// The squeeze diagnostics and what each says (README "Metrics").
const SQUEEZE: &[(&str, &str)] = &[
    (
        "squeeze/chosen_logps_delta",
        "mean of log π(y_w|x) − log π_ref(y_w|x): below zero, the chosen response is being squeezed",
    ),
    (
        "squeeze/rejected_logps_delta",
        "the same for the rejected response",
    ),
    (
        "squeeze/top_nontarget_prob",
        "mean over chosen-response tokens of the most likely wrong token's probability (the paper's y*), which the squeezing effect inflates",
    ),
    (
        "squeeze/ce_logit_hessian_trace",
        "mean over response tokens of tr(H_z) = 1 − ‖p‖², the logit-Hessian trace that scales SAM's correction",
    ),
];

/// Train metrics shown first, in this order; the rest follow alphabetically.
const FIRST: &[&str] = &[
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "learning_rate",
];

/// What the page shows of one run.
struct Run {
    label: String,
    dir: PathBuf,
    color: &'static str,
    series: BTreeMap<String, Vec<(f64, f64)>>,
    train: Option<Value>,
    eval: Option<Value>,
    /// Dotted key → value, when a config was found.
    config: Option<BTreeMap<String, String>>,
    /// The newest evaluation's samples.
    samples: Vec<Value>,
}

pub fn run(args: ReportArgs) -> Result<()> {
    if !args.labels.is_empty() && args.labels.len() != args.runs.len() {
        bail!(
            "got {} --label for {} runs; give one per run or none",
            args.labels.len(),
            args.runs.len()
        );
    }
    let runs = args
        .runs
        .iter()
        .enumerate()
        .map(|(i, input)| load(input, args.labels.get(i), i))
        .collect::<Result<Vec<_>>>()?;
    let html = page(&args.title, &runs);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&args.out, html)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("{}", args.out.display());
    Ok(())
}

fn load(input: &Path, label: Option<&String>, i: usize) -> Result<Run> {
    let (dir, metrics) = match input.is_dir() {
        true => (input.to_path_buf(), input.join("metrics.jsonl")),
        false => (
            input.parent().map(Path::to_path_buf).unwrap_or_default(),
            input.to_path_buf(),
        ),
    };
    if !metrics.is_file() {
        bail!(
            "{}: no metrics.jsonl (expected a training's output_dir)",
            input.display()
        );
    }
    let series = crate::plot::read_metrics(&metrics)?;
    let (train, eval) = crate::card::latest_metrics(&metrics);
    let config = config_file(&dir)
        .map(|path| -> Result<BTreeMap<String, String>> {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let value: toml::Value =
                toml::from_str(&text).with_context(|| format!("{}: not TOML", path.display()))?;
            Ok(crate::config::flatten(value)
                .into_iter()
                .map(|(k, v)| (k, v.to_string()))
                .collect())
        })
        .transpose()?;
    let samples = latest_samples(&dir.join("samples.jsonl"))?;
    Ok(Run {
        label: label
            .cloned()
            .unwrap_or_else(|| crate::plot::run_name(&metrics)),
        dir,
        color: COLORS[i % COLORS.len()],
        series,
        train,
        eval,
        config,
        samples,
    })
}

/// The run's config: `training_config.toml`, else the newest checkpoint's.
fn config_file(dir: &Path) -> Option<PathBuf> {
    let own = dir.join("training_config.toml");
    if own.is_file() {
        return Some(own);
    }
    let (complete, _) = crate::checkpoint::list(dir).ok()?;
    complete
        .last()
        .map(|(_, c)| c.join("config.toml"))
        .filter(|p| p.is_file())
}

/// The lines of the highest step in a samples.jsonl (none when there is no file).
fn latest_samples(path: &Path) -> Result<Vec<Value>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    let mut lines = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: malformed JSON line", path.display(), i + 1))?;
        lines.push(v);
    }
    let step = |v: &Value| v.get("step").and_then(Value::as_u64).unwrap_or(0);
    let last = lines.iter().map(step).max().unwrap_or(0);
    lines.retain(|v| step(v) == last);
    Ok(lines)
}

/// Metric keys in display order: [`FIRST`], then the rest alphabetically.
fn ordered(keys: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut keys: Vec<String> = keys
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let rank = |k: &str| FIRST.iter().position(|f| *f == k).unwrap_or(FIRST.len());
    keys.sort_by_key(|k| rank(k));
    keys
}

fn page(title: &str, runs: &[Run]) -> String {
    let mut s = String::new();
    write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <style>{STYLE}</style></head><body>\n<h1>{t}</h1>\n",
        t = escape(title)
    )
    .unwrap();

    // The runs.
    s.push_str("<table class=\"runs\"><tr><th>run</th><th>directory</th><th>last step</th><th>config</th></tr>\n");
    for r in runs {
        let last = r
            .train
            .as_ref()
            .and_then(|t| t.get("step"))
            .map_or("–".into(), |v| v.to_string());
        writeln!(
            s,
            "<tr><td><span class=\"swatch\" style=\"background:{}\"></span>{}</td><td><code>{}</code></td><td>{last}</td><td>{}</td></tr>",
            r.color,
            escape(&r.label),
            escape(&r.dir.display().to_string()),
            if r.config.is_some() { "found" } else { "not found" }
        )
        .unwrap();
    }
    s.push_str("</table>\n");

    config_section(&mut s, runs);
    final_metrics(&mut s, runs);

    // Curves: squeeze diagnostics apart, train then eval.
    let keys: BTreeSet<String> = runs.iter().flat_map(|r| r.series.keys().cloned()).collect();
    let is_squeeze = |k: &str| k.trim_start_matches("eval_").starts_with("squeeze/");
    let train: Vec<String> = ordered(
        keys.iter()
            .filter(|k| !k.starts_with("eval_") && !is_squeeze(k))
            .cloned(),
    );
    let eval: Vec<String> = ordered(
        keys.iter()
            .filter(|k| k.starts_with("eval_") && !is_squeeze(k))
            .cloned(),
    );
    s.push_str("<h2>Training curves</h2>\n");
    charts(&mut s, runs, &train);
    s.push_str("<h2>Evaluation curves</h2>\n");
    charts(&mut s, runs, &eval);

    s.push_str(
        "<h2>Squeeze diagnostics</h2>\n<p>The squeezing effect (the paper's section 3): DPO's \
         negative gradient on the rejected response pushes probability mass onto the already \
         most likely token, so the chosen response can lose probability too. logits-SAM \
         counters it.</p>\n<dl>",
    );
    for (key, meaning) in SQUEEZE {
        write!(s, "<dt><code>{key}</code></dt><dd>{}</dd>", escape(meaning)).unwrap();
    }
    s.push_str("</dl>\n");
    let squeeze: Vec<String> = SQUEEZE
        .iter()
        .flat_map(|(k, _)| [k.to_string(), format!("eval_{k}")])
        .filter(|k| keys.contains(k))
        .collect();
    charts(&mut s, runs, &squeeze);

    samples_section(&mut s, runs);
    write!(
        s,
        "<footer><span id=\"rendered\">charts not drawn (scripts off)</span></footer>\n\
         <script>{SCRIPT}</script>\n</body></html>\n"
    )
    .unwrap();
    s
}

fn charts(s: &mut String, runs: &[Run], keys: &[String]) {
    if keys.is_empty() {
        s.push_str("<p class=\"none\">No such metrics in these runs.</p>\n");
        return;
    }
    s.push_str("<div class=\"grid\">\n");
    for key in keys {
        let lines: Vec<Line> = runs
            .iter()
            .filter_map(|r| {
                Some(Line {
                    label: &r.label,
                    color: r.color,
                    points: r.series.get(key)?,
                })
            })
            .collect();
        s.push_str(&chart::svg(key, &lines));
        s.push('\n');
    }
    s.push_str("</div>\n");
}

fn config_section(s: &mut String, runs: &[Run]) {
    s.push_str("<h2>Configuration</h2>\n");
    let with: Vec<&Run> = runs.iter().filter(|r| r.config.is_some()).collect();
    let keys: BTreeSet<&String> = with
        .iter()
        .flat_map(|r| r.config.as_ref().into_iter().flat_map(|c| c.keys()))
        .collect();
    let value = |r: &Run, k: &str| -> Option<String> { r.config.as_ref()?.get(k).cloned() };
    if with.len() >= 2 {
        let differ: Vec<&String> = keys
            .iter()
            .copied()
            .filter(|k| with.iter().any(|r| value(r, k) != value(with[0], k)))
            .collect();
        match differ.is_empty() {
            true => s.push_str("<p>The configs are identical.</p>\n"),
            false => {
                s.push_str("<p>Keys whose values differ:</p>\n");
                table(s, &with, &differ, |r, k| {
                    value(r, k).unwrap_or("(unset)".into())
                });
            }
        }
    } else if with.is_empty() {
        s.push_str("<p class=\"none\">No run has a config (training_config.toml or a checkpoint's config.toml).</p>\n");
    }
    if !with.is_empty() {
        s.push_str("<details><summary>Every key</summary>\n");
        let all: Vec<&String> = keys.into_iter().collect();
        table(s, &with, &all, |r, k| {
            value(r, k).unwrap_or("(unset)".into())
        });
        s.push_str("</details>\n");
    }
}

/// A keys × runs table.
fn table(s: &mut String, runs: &[&Run], keys: &[&String], cell: impl Fn(&Run, &str) -> String) {
    s.push_str("<table><tr><th>key</th>");
    for r in runs {
        write!(s, "<th>{}</th>", escape(&r.label)).unwrap();
    }
    s.push_str("</tr>\n");
    for k in keys {
        write!(s, "<tr><td><code>{}</code></td>", escape(k)).unwrap();
        for r in runs {
            write!(s, "<td>{}</td>", escape(&cell(r, k))).unwrap();
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
}

fn final_metrics(s: &mut String, runs: &[Run]) {
    s.push_str("<h2>Final metrics</h2>\n<p>The last training line and the last evaluation of each run.</p>\n");
    let numeric_keys = |line: Option<&Value>| -> Vec<String> {
        line.and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(k, v)| v.is_number() && k.as_str() != "step")
            .map(|(k, _)| k.clone())
            .collect()
    };
    let train = ordered(runs.iter().flat_map(|r| numeric_keys(r.train.as_ref())));
    let eval = ordered(runs.iter().flat_map(|r| numeric_keys(r.eval.as_ref())));
    let all: Vec<&Run> = runs.iter().collect();
    let cell = |line: Option<&Value>, k: &str| {
        line.and_then(|l| l.get(k))
            .and_then(Value::as_f64)
            .map_or("–".into(), chart::number)
    };
    let mut keys: Vec<String> = vec!["step".into()];
    keys.extend(train);
    let key_refs: Vec<&String> = keys.iter().collect();
    s.push_str("<h3>Training</h3>\n");
    table(s, &all, &key_refs, |r, k| cell(r.train.as_ref(), k));
    let mut keys: Vec<String> = vec!["step".into()];
    keys.extend(eval);
    let key_refs: Vec<&String> = keys.iter().collect();
    s.push_str("<h3>Evaluation</h3>\n");
    table(s, &all, &key_refs, |r, k| cell(r.eval.as_ref(), k));
}

fn samples_section(s: &mut String, runs: &[Run]) {
    s.push_str("<h2>Latest samples</h2>\n");
    if runs.iter().all(|r| r.samples.is_empty()) {
        s.push_str("<p class=\"none\">No samples (training.eval_generate = N writes samples.jsonl at each evaluation).</p>\n");
        return;
    }
    let index = |v: &Value| v.get("index").and_then(Value::as_u64).unwrap_or(0);
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let indices: BTreeSet<u64> = runs
        .iter()
        .flat_map(|r| r.samples.iter().map(index))
        .collect();
    s.push_str("<table class=\"samples\"><tr><th>prompt</th>");
    for r in runs {
        let step = r
            .samples
            .first()
            .and_then(|v| v.get("step"))
            .map_or("–".into(), |v| v.to_string());
        write!(s, "<th>{} (step {step})</th>", escape(&r.label)).unwrap();
    }
    s.push_str("</tr>\n");
    for i in indices {
        let prompt = runs
            .iter()
            .find_map(|r| r.samples.iter().find(|v| index(v) == i))
            .map(|v| text(v, "prompt"))
            .unwrap_or_default();
        write!(s, "<tr><td><pre>{}</pre></td>", escape(&prompt)).unwrap();
        for r in runs {
            match r.samples.iter().find(|v| index(v) == i) {
                Some(v) => write!(
                    s,
                    "<td><pre>{}</pre><span class=\"meta\">{} tokens, {}</span></td>",
                    escape(&text(v, "completion")),
                    v.get("completion_tokens")
                        .map_or("?".into(), |t| t.to_string()),
                    escape(&text(v, "finish_reason"))
                ),
                None => write!(s, "<td class=\"none\">–</td>"),
            }
            .unwrap();
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
}

const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2em;color:#222;max-width:1500px}\
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}\
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f4f4f4}.swatch{display:inline-block;width:.9em;height:.9em;margin-right:.4em;border-radius:2px}\
.grid{display:flex;flex-wrap:wrap;gap:10px}\
svg.chart{background:#fff;border:1px solid #e4e4e4}\
svg .frame{fill:none;stroke:#bbb}svg .grid{stroke:#eee}\
svg text{font-size:11px;fill:#444}svg .title{font-size:12px;font-weight:600;text-anchor:middle}\
pre{white-space:pre-wrap;margin:0;max-width:40em;font-size:.85em}\
.meta{color:#777;font-size:.8em}.none{color:#888}\
footer{margin-top:2em;color:#888;font-size:.8em}";

/// Counts the charts whose lines have a drawn extent (it needs layout, so it proves they
/// rendered), shows it in the footer, and leaves it on `<body data-charts-rendered>`.
const SCRIPT: &str = "\
window.addEventListener('load', function () {\
  var charts = document.querySelectorAll('svg.chart');\
  var drawn = 0;\
  charts.forEach(function (c) {\
    var ok = Array.prototype.some.call(c.querySelectorAll('g.series'), function (g) {\
      var b = g.getBBox(); return b.width > 0 || b.height > 0;\
    });\
    if (ok) drawn++;\
  });\
  document.body.setAttribute('data-charts', charts.length);\
  document.body.setAttribute('data-charts-rendered', drawn);\
  document.getElementById('rendered').textContent = drawn + ' of ' + charts.length + ' charts drawn';\
});";
