//! Safety checks that halt a share instead of letting a cycle propagate deletions.
