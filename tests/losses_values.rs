//! Every registry loss against values worked by hand, edge cases (equal log-probs, huge margins
//! without overflow), and weighted combinations as `loss_type` lists configure them.

use candle_core::{Device, Tensor, Var};
use dpo_sam::config::{Config, LossType, NllReduction};
use dpo_sam::losses::{Loss, LossParams, PairLogps};

fn t(v: &[f64]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn v(x: &Tensor) -> Vec<f64> {
    x.to_vec1::<f64>().unwrap()
}

/// log(1 + e^x), in plain f64.
fn softplus(x: f64) -> f64 {
    x.exp().ln_1p()
}

/// One pair: log π(y_w) = −10, log π(y_l) = −15, reference −12 / −14, 4 and 5 response tokens.
/// So the log-ratios are +2 (chosen) and −1 (rejected).
fn pair() -> PairLogps {
    pairs(&[-10.0], &[-15.0], &[-12.0], &[-14.0], &[4.0], &[5.0])
}

fn pairs(c: &[f64], r: &[f64], rc: &[f64], rr: &[f64], nc: &[f64], nr: &[f64]) -> PairLogps {
    PairLogps {
        chosen: t(c),
        rejected: t(r),
        ref_chosen: Some(t(rc)),
        ref_rejected: Some(t(rr)),
        chosen_tokens: t(nc),
        rejected_tokens: t(nr),
    }
}

fn loss(kind: LossType, params: LossParams, lp: &PairLogps) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let out = Loss::single(kind, params).compute(lp).unwrap();
    (
        v(&out.losses),
        v(&out.chosen_rewards),
        v(&out.rejected_rewards),
    )
}

fn close(got: f64, want: f64) {
    assert!(
        (got - want).abs() < 1e-9 * want.abs().max(1.0),
        "got {got}, want {want}"
    );
}

fn p() -> LossParams {
    LossParams {
        beta: 0.5,
        ..Default::default()
    }
}

#[test]
fn sigmoid_with_label_smoothing() {
    // z = β(2 − (−1)) = 1.5; cDPO: 0.9·softplus(−1.5) + 0.1·softplus(1.5)
    let (l, rc, rr) = loss(
        LossType::Sigmoid,
        LossParams {
            label_smoothing: 0.1,
            ..p()
        },
        &pair(),
    );
    close(l[0], 0.9 * softplus(-1.5) + 0.1 * softplus(1.5));
    assert_eq!((rc[0], rr[0]), (1.0, -0.5));
    let (l, _, _) = loss(LossType::Sigmoid, p(), &pair());
    close(l[0], softplus(-1.5));
}

#[test]
fn robust_dpo() {
    // [0.9·softplus(−1.5) − 0.1·softplus(1.5)] / (1 − 0.2)
    let (l, _, _) = loss(
        LossType::Robust,
        LossParams {
            label_smoothing: 0.1,
            ..p()
        },
        &pair(),
    );
    close(l[0], (0.9 * softplus(-1.5) - 0.1 * softplus(1.5)) / 0.8);
    // ε = 0 is plain DPO
    close(loss(LossType::Robust, p(), &pair()).0[0], softplus(-1.5));
}

#[test]
fn hinge() {
    // β = 0.2: z = 0.6, max(0, 1 − 0.6) = 0.4; β = 0.5: z = 1.5 → 0
    close(
        loss(LossType::Hinge, LossParams { beta: 0.2, ..p() }, &pair()).0[0],
        0.4,
    );
    close(loss(LossType::Hinge, p(), &pair()).0[0], 0.0);
}

#[test]
fn ipo_uses_length_averaged_log_ratios() {
    // chosen 2/4 = 0.5, rejected −1/5 = −0.2, h = 0.7; τ = 0.5: (0.7 − 1)² = 0.09
    let (l, rc, rr) = loss(LossType::Ipo, p(), &pair());
    close(l[0], 0.09);
    // TRL 1.x logs β × the summed log-ratios for every loss type, IPO included.
    close(rc[0], 1.0);
    close(rr[0], -0.5);
}

/// The paper's Table 5 written literally: λ × the summed NLL of the chosen response.
fn literal() -> LossParams {
    LossParams {
        nll_reduction: NllReduction::SequenceSum,
        ..p()
    }
}

#[test]
fn slic_hf_as_in_table_5() {
    let params = LossParams {
        slic_delta: 1.0,
        slic_lambda: 0.1,
        ..literal()
    };
    // margin met: max(0, 1 + (−10)·(−1) + (−15)) = 0, NLL term −0.1·(−10) = 1
    let (l, rc, rr) = loss(LossType::Slic, params.clone(), &pair());
    close(l[0], 1.0);
    assert_eq!((rc[0], rr[0]), (-5.0, -7.5), "rewards β·log π");
    // margin violated: max(0, 1 + 12 − 11.5) = 1.5, plus 1.2
    let lp = pairs(&[-12.0], &[-11.5], &[0.0], &[0.0], &[1.0], &[1.0]);
    close(loss(LossType::Slic, params, &lp).0[0], 2.7);
}

#[test]
fn cpo_as_in_table_5() {
    // −log σ(0.5·(−10 + 15)) − 1·(−10) = softplus(−2.5) + 10
    let params = LossParams {
        cpo_alpha: 1.0,
        ..literal()
    };
    close(
        loss(LossType::Cpo, params, &pair()).0[0],
        softplus(-2.5) + 10.0,
    );
}

/// Two pairs of different lengths: log π(y_w) = −10 over 4 tokens and −3 over 2, log π(y_l) =
/// −15 and −1. TRL's CPOTrainer: `losses.mean() + cpo_alpha * nll_loss`, where nll_loss is
/// `nn.CrossEntropyLoss()` (a mean) over every chosen token of the batch: (10 + 3) / (4 + 2).
/// TRL's DPOTrainer `sft`: `-chosen_per_token_logps[chosen_mask].mean()`, the same mean.
#[test]
fn nll_terms_default_to_trl_token_mean_over_the_micro_batch() {
    let lp = pairs(
        &[-10.0, -3.0],
        &[-15.0, -1.0],
        &[0.0, 0.0],
        &[0.0, 0.0],
        &[4.0, 2.0],
        &[5.0, 1.0],
    );
    assert_eq!(LossParams::default().nll_reduction, NllReduction::TokenMean);
    let params = LossParams {
        cpo_alpha: 0.7,
        slic_lambda: 0.3,
        ..p()
    };
    let trl_nll = (10.0 + 3.0) / (4.0 + 2.0);
    let sigmoid_part = |c: f64, r: f64| softplus(-0.5 * (c - r));
    let cpo = Loss::single(LossType::Cpo, params.clone())
        .compute(&lp)
        .unwrap();
    let want = (sigmoid_part(-10.0, -15.0) + sigmoid_part(-3.0, -1.0)) / 2.0 + 0.7 * trl_nll;
    close(cpo.loss.to_scalar::<f64>().unwrap(), want);
    close(
        cpo.nll.as_ref().unwrap().to_scalar::<f64>().unwrap(),
        trl_nll,
    );
    // Each pair scored alone: its own token mean (10/4 and 3/2).
    let per_pair = v(&cpo.losses);
    close(per_pair[0], sigmoid_part(-10.0, -15.0) + 0.7 * 2.5);
    close(per_pair[1], sigmoid_part(-3.0, -1.0) + 0.7 * 1.5);

    // SLiC-HF: hinge per pair (δ = 1: max(0, 1 − 5) = 0 and max(0, 1 + 2) = 3), mean, + λ × NLL.
    let slic = Loss::single(LossType::Slic, params.clone())
        .compute(&lp)
        .unwrap();
    close(
        slic.loss.to_scalar::<f64>().unwrap(),
        (0.0 + 3.0) / 2.0 + 0.3 * trl_nll,
    );

    // `sft` in a mix, as TRL's DPOTrainer: Σ wᵢ · per_sequence_lossᵢ.mean(), sft's being the
    // batch token mean; with `rpo_alpha` the same term.
    let mix = Loss {
        terms: vec![(LossType::Sigmoid, 1.0), (LossType::Sft, 0.25)],
        params: params.clone(),
    };
    let out = mix.compute(&lp).unwrap();
    let dpo = |c: f64, r: f64| softplus(-0.5 * (c - r));
    close(
        out.loss.to_scalar::<f64>().unwrap(),
        (dpo(-10.0, -15.0) + dpo(-3.0, -1.0)) / 2.0 + 0.25 * trl_nll,
    );

    // The paper's literal form: λ × Σ log π(y_w) per pair, averaged over pairs.
    let literal = Loss::single(
        LossType::Cpo,
        LossParams {
            nll_reduction: NllReduction::SequenceSum,
            ..params
        },
    )
    .compute(&lp)
    .unwrap();
    close(
        literal.loss.to_scalar::<f64>().unwrap(),
        (sigmoid_part(-10.0, -15.0) + sigmoid_part(-3.0, -1.0)) / 2.0 + 0.7 * (10.0 + 3.0) / 2.0,
    );
    close(
        literal.loss.to_scalar::<f64>().unwrap(),
        v(&literal.losses).iter().sum::<f64>() / 2.0,
    );
}

#[test]
fn simpo_uses_average_log_probs_and_gamma() {
    // β = 2, γ = 0.5: averages −2.5 and −3, z = 2·0.5 − 0.5 = 0.5
    let params = LossParams {
        beta: 2.0,
        simpo_gamma: 0.5,
        ..p()
    };
    let (l, rc, rr) = loss(LossType::Simpo, params, &pair());
    close(l[0], softplus(-0.5));
    assert_eq!((rc[0], rr[0]), (-5.0, -6.0));
}

#[test]
fn dpop_penalises_chosen_below_reference() {
    // chosen above its reference: plain DPO
    close(loss(LossType::Dpop, p(), &pair()).0[0], softplus(-1.5));
    // chosen 1 below: z = 0.5·((−1) − (−1) − 50·1) = −25
    let lp = pairs(&[-13.0], &[-15.0], &[-12.0], &[-14.0], &[4.0], &[5.0]);
    close(loss(LossType::Dpop, p(), &lp).0[0], softplus(25.0));
}

#[test]
fn sft_is_per_token_chosen_nll() {
    close(loss(LossType::Sft, p(), &pair()).0[0], 2.5);
}

#[test]
fn equal_log_probs() {
    let lp = pairs(&[-7.0], &[-7.0], &[-7.0], &[-7.0], &[3.0], &[3.0]);
    let ln2 = std::f64::consts::LN_2;
    close(loss(LossType::Sigmoid, p(), &lp).0[0], ln2);
    close(
        loss(
            LossType::Robust,
            LossParams {
                label_smoothing: 0.2,
                ..p()
            },
            &lp,
        )
        .0[0],
        ln2 * (0.8 - 0.2) / 0.6,
    );
    close(loss(LossType::Hinge, p(), &lp).0[0], 1.0);
    close(loss(LossType::Ipo, p(), &lp).0[0], 1.0);
    close(loss(LossType::Dpop, p(), &lp).0[0], ln2);
    close(
        loss(
            LossType::Simpo,
            LossParams {
                simpo_gamma: 0.5,
                ..p()
            },
            &lp,
        )
        .0[0],
        softplus(0.5),
    );
    close(
        loss(
            LossType::Cpo,
            LossParams {
                cpo_alpha: 1.0,
                ..literal()
            },
            &lp,
        )
        .0[0],
        ln2 + 7.0,
    );
    close(
        loss(
            LossType::Cpo,
            LossParams {
                cpo_alpha: 1.0,
                ..p()
            },
            &lp,
        )
        .0[0],
        ln2 + 7.0 / 3.0,
    );
    close(
        loss(
            LossType::Slic,
            LossParams {
                slic_delta: 1.0,
                slic_lambda: 0.0,
                ..p()
            },
            &lp,
        )
        .0[0],
        1.0,
    );
}

#[test]
fn huge_margins_neither_overflow_nor_lose_the_gradient() {
    // Margins of ±1e4 nats at β = 1: the losses are 0 and 1e4, the gradients 0 and −1.
    for kind in [
        LossType::Sigmoid,
        LossType::Robust,
        LossType::Dpop,
        LossType::Cpo,
        LossType::Simpo,
    ] {
        let chosen = Var::from_tensor(&t(&[0.0, -1e4])).unwrap();
        let lp = PairLogps {
            chosen: chosen.as_tensor().clone(),
            rejected: t(&[-1e4, 0.0]),
            ref_chosen: Some(t(&[0.0, 0.0])),
            ref_rejected: Some(t(&[0.0, 0.0])),
            chosen_tokens: t(&[1.0, 1.0]),
            rejected_tokens: t(&[1.0, 1.0]),
        };
        let params = LossParams {
            beta: 1.0,
            cpo_alpha: 0.0,
            simpo_gamma: 0.0,
            dpop_lambda: 0.0,
            ..Default::default()
        };
        let out = Loss::single(kind, params).compute(&lp).unwrap();
        let l = v(&out.losses);
        assert!(l.iter().all(|x| x.is_finite()), "{kind:?}: {l:?}");
        assert!(l[0].abs() < 1e-9, "{kind:?}: {l:?}");
        let g = v(out
            .losses
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&chosen)
            .unwrap());
        assert!(g.iter().all(|x| x.is_finite()), "{kind:?}: {g:?}");
        assert!(
            g[0].abs() < 1e-9 && (g[1] + 1.0).abs() < 1e-9,
            "{kind:?}: {g:?}"
        );
    }
    // The reversed pair: the sigmoid loss grows linearly instead of overflowing.
    let lp = pairs(&[-1e4], &[0.0], &[0.0], &[0.0], &[1.0], &[1.0]);
    close(
        loss(LossType::Sigmoid, LossParams { beta: 1.0, ..p() }, &lp).0[0],
        1e4,
    );
}

#[test]
fn weighted_combination_sums_terms_and_keeps_reference_rewards() {
    // sft listed first, sigmoid second: loss = 0.5·2.5 + 1·softplus(−1.5). Rewards are TRL
    // 1.x's β × log-ratio whatever the mix (not Σ weight × each term's rewards).
    let mix = Loss {
        terms: vec![(LossType::Sft, 0.5), (LossType::Sigmoid, 1.0)],
        params: p(),
    };
    let out = mix.compute(&pair()).unwrap();
    close(v(&out.losses)[0], 1.25 + softplus(-1.5));
    assert_eq!(
        (v(&out.chosen_rewards)[0], v(&out.rejected_rewards)[0]),
        (1.0, -0.5)
    );
    let ipo_mix = Loss {
        terms: vec![(LossType::Ipo, 0.3), (LossType::Sigmoid, 2.0)],
        params: p(),
    };
    let out = ipo_mix.compute(&pair()).unwrap();
    assert_eq!(
        (v(&out.chosen_rewards)[0], v(&out.rejected_rewards)[0]),
        (1.0, -0.5)
    );
    assert!(mix.needs_reference());
    let free = Loss {
        terms: vec![(LossType::Cpo, 1.0), (LossType::Sft, 2.0)],
        params: p(),
    };
    assert!(!free.needs_reference());
}

const MINIMAL: &str = r#"
output_dir = "runs/x"
[model]
name_or_path = "builtin:tiny-gpt2"
[data]
train = "builtin:arith"
[training]
learning_rate = 1e-3
batch_size = 8
"#;

#[test]
fn loss_type_list_weights_and_rpo_alpha_from_config() {
    let ov: Vec<String> = [
        "training.loss_type=[\"sigmoid\", \"ipo\"]",
        "training.loss_weights=[0.8, 0.2]",
        "training.rpo_alpha=0.5",
        "training.beta=0.5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cfg = Config::parse(MINIMAL, "cfg.toml", &ov).unwrap();
    let loss = dpo_sam::train::configured_loss(&cfg);
    assert_eq!(
        loss.terms,
        vec![
            (LossType::Sigmoid, 0.8),
            (LossType::Ipo, 0.2),
            (LossType::Sft, 0.5)
        ]
    );
    let l = v(&loss.compute(&pair()).unwrap().losses)[0];
    close(l, 0.8 * softplus(-1.5) + 0.2 * 0.09 + 0.5 * 2.5);
}
