//! At most one log line per cause a minute. A guest can make every cycle fail, and trigger
//! cycles at will: without a bound, its error text (up to 4 KiB each) would fill the journal.
//! A cause is named by the caller (what failed, and for which share), never by the message,
//! which the guest controls; a line let through says how many like it were held back, and
//! carries at most [`MAX_LOGGED_CHARS`] of the message.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The least time between two lines of one cause.
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// Characters of a message a line carries.
pub const MAX_LOGGED_CHARS: usize = 512;

#[derive(Debug, Default)]
pub struct LogLimit {
    /// Cause → when its last line went out, and how many were held back since.
    causes: HashMap<String, (Instant, u64)>,
}

impl LogLimit {
    /// The line to log for `cause` now, or `None` to stay quiet: `message` cut to
    /// [`MAX_LOGGED_CHARS`], with the count of lines held back since the last one.
    pub fn admit(&mut self, cause: &str, message: &str, now: Instant) -> Option<String> {
        let held = match self.causes.get_mut(cause) {
            Some((last, held)) if now.saturating_duration_since(*last) < LOG_EVERY => {
                *held += 1;
                return None;
            }
            Some((last, held)) => {
                *last = now;
                std::mem::take(held)
            }
            None => {
                self.causes.insert(cause.to_owned(), (now, 0));
                0
            }
        };
        let mut line: String = message.chars().take(MAX_LOGGED_CHARS).collect();
        if line.len() < message.len() {
            line.push_str("...");
        }
        if held > 0 {
            line.push_str(&format!(
                " ({held} more like it in the last minute or more)"
            ));
        }
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_cause_a_minute_with_a_count_of_the_rest() {
        let mut limit = LogLimit::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(limit.admit("a", "boom", at(0)).as_deref(), Some("boom"));
        assert_eq!(limit.admit("a", "boom 2", at(1)), None);
        assert_eq!(limit.admit("a", "boom 3", at(59)), None);
        // Another cause is not held back by the first.
        assert_eq!(limit.admit("b", "other", at(2)).as_deref(), Some("other"));
        assert_eq!(
            limit.admit("a", "boom 4", at(60)).as_deref(),
            Some("boom 4 (2 more like it in the last minute or more)")
        );
        assert_eq!(
            limit.admit("a", "boom 5", at(121)).as_deref(),
            Some("boom 5")
        );
    }

    #[test]
    fn a_long_message_is_cut() {
        let mut limit = LogLimit::default();
        let long = "x".repeat(4096);
        let line = limit.admit("a", &long, Instant::now()).unwrap();
        assert_eq!(line.len(), MAX_LOGGED_CHARS + 3);
    }
}
