//! `dpo-sam report` on two real runs (DPO and DPO + logits-SAM): the page's content — config
//! differences, final metrics, one chart per metric, the squeeze diagnostics, the latest
//! samples, nothing fetched from anywhere — and, in a real headless Chromium, that it loads
//! without a console message and draws every chart. Where no Chromium is installed
//! (`scripts/ensure-chromium.sh` installs Debian's) the browser test says so and passes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::dpo_sam;

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two 8-step runs differing in `sam.kind`, evaluated (with 2 samples) every 4 steps, and the
/// report comparing them.
fn report() -> &'static (Vec<PathBuf>, PathBuf) {
    static R: std::sync::OnceLock<(Vec<PathBuf>, PathBuf)> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let mut runs = Vec::new();
        for kind in ["logits", "none"] {
            let out = dir.join(format!("sam-{kind}"));
            let sam = format!("sam.kind=\"{kind}\"");
            ok(&common::train_tiny(
                &out,
                &[
                    "training.max_steps=8",
                    "training.eval_steps=4",
                    "training.eval_generate=2",
                    "generate.max_new_tokens=5",
                    sam.as_str(),
                ],
            ));
            runs.push(out);
        }
        let html = dir.join("out/report.html");
        let (a, b, h) = (
            runs[0].display().to_string(),
            runs[1].display().to_string(),
            html.display().to_string(),
        );
        ok(&dpo_sam(&[
            "report",
            &a,
            &b,
            "--label",
            "logits-SAM",
            "--label",
            "DPO",
            "--out",
            &h,
        ]));
        (runs, html)
    })
}

#[test]
fn the_page_compares_configs_metrics_curves_squeeze_and_samples() {
    let (runs, html) = report();
    let page = std::fs::read_to_string(html).unwrap();
    // Config differences: sam.kind (and output_dir) differ, nothing else.
    let diff = page
        .split("<p>Keys whose values differ:</p>")
        .nth(1)
        .unwrap()
        .split("</table>")
        .next()
        .unwrap();
    assert!(
        diff.contains(
            "<td><code>sam.kind</code></td><td>&quot;logits&quot;</td><td>&quot;none&quot;</td>"
        ),
        "{diff}"
    );
    assert_eq!(
        diff.matches("<tr><td>").count(),
        2,
        "sam.kind and output_dir: {diff}"
    );

    // One chart per metric of either run (train and eval), squeeze ones in their section.
    let mut metrics = BTreeSet::new();
    for run in runs {
        for line in std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
        {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v.get("step").is_none() {
                continue;
            }
            for (k, x) in v.as_object().unwrap() {
                if k != "step" && x.is_number() {
                    metrics.insert(k.clone());
                }
            }
        }
    }
    let charts = page.matches("<svg class=\"chart\"").count();
    assert_eq!(charts, metrics.len(), "{metrics:?}");
    for m in [
        "loss",
        "eval_rewards/accuracies",
        "sam/loss_post",
        "squeeze/top_nontarget_prob",
    ] {
        assert!(
            page.contains(&format!("aria-label=\"{m}\"")),
            "no chart of {m}"
        );
    }
    let squeeze = page.split("<h2>Squeeze diagnostics</h2>").nth(1).unwrap();
    assert!(squeeze
        .split("<h2>")
        .next()
        .unwrap()
        .contains("aria-label=\"squeeze/ce_logit_hessian_trace\""));
    // sam/* exists for the logits-SAM run only: its charts have one line, the loss chart two.
    let chart = |m: &str| {
        page.split(&format!("aria-label=\"{m}\""))
            .nth(1)
            .unwrap()
            .split("</svg>")
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        chart("sam/loss_post")
            .matches("<g class=\"series\"")
            .count(),
        1
    );
    assert_eq!(chart("loss").matches("<g class=\"series\"").count(), 2);

    // Final metrics and samples.
    let finals = page.split("<h2>Final metrics</h2>").nth(1).unwrap();
    assert!(
        finals.contains("<td><code>eval_loss</code></td>"),
        "{finals}"
    );
    let samples = page.split("<h2>Latest samples</h2>").nth(1).unwrap();
    assert!(samples.contains("logits-SAM (step 8)") && samples.contains("DPO (step 8)"));
    assert_eq!(samples.matches("<tr><td><pre>").count(), 2, "two prompts");

    // Self-contained: nothing to fetch.
    for attr in [" src=", " href=", "url(", "@import"] {
        assert!(!page.contains(attr), "the page references {attr}");
    }
}

/// A Chromium to run: `DPO_SAM_CHROMIUM`, else the first of the usual names on PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DPO_SAM_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
    .find(|p| p.is_file())
}

/// Loads `page` headless and returns the DOM after load and the console lines logged.
fn load(chrome: &Path, page: &Path) -> (String, Vec<String>) {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.canonicalize().unwrap().display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "chromium failed: {stderr}");
    // Chromium logs every console message, whatever its level, as `…:CONSOLE…] "text"`.
    let console = stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(String::from)
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

fn attr(dom: &str, name: &str) -> Option<usize> {
    dom.split(&format!("{name}=\""))
        .nth(1)?
        .split('"')
        .next()?
        .parse()
        .ok()
}

#[test]
fn the_page_loads_in_headless_chromium_and_draws_every_chart() {
    let Some(chrome) = chromium() else {
        eprintln!(
            "skipping the browser check: no chromium on PATH (scripts/ensure-chromium.sh installs Debian's; DPO_SAM_CHROMIUM names another)"
        );
        return;
    };
    // The console capture works: a page that logs and throws shows both.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.html");
    std::fs::write(
        &bad,
        "<html><body><script>console.log('hello'); nosuchfunction();</script></body></html>",
    )
    .unwrap();
    let (_, console) = load(&chrome, &bad);
    assert!(
        console
            .iter()
            .any(|l| l.contains("Uncaught ReferenceError")),
        "{console:#?}"
    );

    let (_, html) = report();
    let (dom, console) = load(&chrome, html);
    assert!(console.is_empty(), "console messages: {console:#?}");
    let charts = std::fs::read_to_string(html)
        .unwrap()
        .matches("<svg class=\"chart\"")
        .count();
    assert!(charts > 20);
    assert_eq!(attr(&dom, "data-charts"), Some(charts), "the script ran");
    assert_eq!(
        attr(&dom, "data-charts-rendered"),
        Some(charts),
        "every chart has a drawn line"
    );
    assert!(dom.contains(&format!("{charts} of {charts} charts drawn")));
}
