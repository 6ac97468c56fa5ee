//! Waiting between attempts of an HTTP request: shared by the judge client (`eval
//! --judge-url`) and Hub uploads (`upload`).

use rand::Rng;
use std::time::Duration;

/// Exponential backoff with jitter (so parallel workers do not retry in lockstep), capped at a
/// minute; a server's Retry-After wins when longer.
pub fn backoff(base: Duration, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let jittered = exp.mul_f64(rand::rng().random_range(0.5..1.0));
    jittered
        .max(retry_after.unwrap_or_default())
        .min(Duration::from_secs(60))
}

/// The wait a response asks for in its `Retry-After` header (in seconds), if any.
pub fn retry_after(response: &ureq::Response) -> Option<Duration> {
    response
        .header("retry-after")
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        assert!(backoff(base, 0, None) <= base);
        assert!(backoff(base, 3, None) >= Duration::from_millis(400));
        assert_eq!(backoff(base, 30, None), Duration::from_secs(60));
        assert!(backoff(base, 0, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
    }
}
