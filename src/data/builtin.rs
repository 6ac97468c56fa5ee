//! The built-in preference task of the embedded default run: sorting letters, reversing words
//! and small additions, where the chosen answer is correct and the rejected one a plausible
//! mistake (letters left unsorted or one pair swapped, a word copied instead of reversed, a sum
//! off by one or ten). Sorting is learnable from local order alone, so held-out reward accuracy
//! rises within a minute of training; the others need more. Deterministic for a seed.

use super::PreferencePair;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;

/// `n_train` training pairs and `n_eval` held-out pairs with prompts disjoint from training.
pub fn arith(
    seed: u64,
    n_train: usize,
    n_eval: usize,
) -> (Vec<PreferencePair>, Vec<PreferencePair>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut pairs = Vec::with_capacity(n_train + n_eval);
    while pairs.len() < n_train + n_eval {
        let pair = match rng.random_range(0..4) {
            0 | 1 => sorting(&mut rng),
            2 => reversal(&mut rng),
            _ => addition(&mut rng),
        };
        if seen.insert(pair.prompt.clone()) {
            pairs.push(pair);
        }
    }
    let eval = pairs.split_off(n_train);
    (pairs, eval)
}

fn addition(rng: &mut impl Rng) -> PreferencePair {
    let a: u32 = rng.random_range(0..100);
    let b: u32 = rng.random_range(0..100);
    let sum = a + b;
    let wrong = match rng.random_range(0..4) {
        0 => sum + 1,
        1 => sum.saturating_sub(1).max(if sum == 0 { 1 } else { 0 }),
        2 => sum + 10,
        _ => {
            // swap the last two digits, or nudge single-digit sums
            let s = sum.to_string();
            if s.len() >= 2 && s.as_bytes()[s.len() - 1] != s.as_bytes()[s.len() - 2] {
                let mut b = s.into_bytes();
                let n = b.len();
                b.swap(n - 1, n - 2);
                String::from_utf8(b)
                    .expect("ascii digits")
                    .parse()
                    .expect("digits")
            } else {
                sum + 2
            }
        }
    };
    PreferencePair {
        prompt: format!("{a}+{b}="),
        chosen: sum.to_string(),
        rejected: wrong.to_string(),
        append_eos: true,
    }
}

fn random_word(rng: &mut impl Rng) -> String {
    let len = rng.random_range(3..7);
    (0..len)
        .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
        .collect()
}

fn sorting(rng: &mut impl Rng) -> PreferencePair {
    let word = random_word(rng);
    let mut sorted: Vec<char> = word.chars().collect();
    sorted.sort_unstable();
    let sorted: String = sorted.into_iter().collect();
    // the typical mistakes: the letters left as given, or one neighbouring pair out of order
    let mut rejected = if rng.random_bool(0.5) {
        word.clone()
    } else {
        let mut v: Vec<char> = sorted.chars().collect();
        let i = rng.random_range(0..v.len() - 1);
        v.swap(i, i + 1);
        v.into_iter().collect()
    };
    if rejected == sorted {
        rejected = sorted.chars().rev().collect();
    }
    if rejected == sorted {
        rejected = format!("{sorted}{}", &sorted[..1]);
    }
    PreferencePair {
        prompt: format!("sort {word}="),
        chosen: sorted,
        rejected,
        append_eos: true,
    }
}

fn reversal(rng: &mut impl Rng) -> PreferencePair {
    let word = random_word(rng);
    let len = word.len();
    let reversed: String = word.chars().rev().collect();
    // the typical mistake: the word copied instead of reversed (or half-reversed)
    let mut rejected = if rng.random_bool(0.5) {
        word.clone()
    } else {
        let half = len / 2;
        format!("{}{}", &reversed[..half], &word[half..])
    };
    if rejected == reversed {
        rejected = format!("{reversed}{}", &reversed[..1]);
    }
    PreferencePair {
        prompt: format!("rev {word}="),
        chosen: reversed,
        rejected,
        append_eos: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_deterministic_disjoint_and_correct() {
        let (train, eval) = arith(7, 300, 50);
        assert_eq!((train.len(), eval.len()), (300, 50));
        assert_eq!(arith(7, 300, 50).0, train);
        assert_ne!(arith(8, 300, 50).0, train);
        let prompts: HashSet<_> = train.iter().map(|p| &p.prompt).collect();
        assert!(eval.iter().all(|p| !prompts.contains(&p.prompt)));
        for p in train.iter().chain(&eval) {
            assert_ne!(p.chosen, p.rejected, "{p:?}");
            if let Some(expr) = p.prompt.strip_suffix('=').filter(|e| e.contains('+')) {
                let (a, b) = expr.split_once('+').unwrap();
                let sum: u32 = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
                assert_eq!(p.chosen, sum.to_string());
            } else if let Some(word) = p.prompt.strip_prefix("rev ") {
                let word = word.strip_suffix('=').unwrap();
                assert_eq!(p.chosen, word.chars().rev().collect::<String>());
            } else {
                let word = p
                    .prompt
                    .strip_prefix("sort ")
                    .unwrap()
                    .strip_suffix('=')
                    .unwrap();
                let mut v: Vec<char> = word.chars().collect();
                v.sort_unstable();
                assert_eq!(p.chosen, v.into_iter().collect::<String>());
            }
        }
    }
}
