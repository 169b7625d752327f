//! The job's secret masker, which grows while the job runs.

use std::sync::{Arc, Mutex};

use crate::logs::{MaskerError, SecretMasker, StepLog};

/// The job's secret masker. It grows while the job runs (a step sets a secret output), so a
/// holder of a snapshot, such as a step's [`StepLog`], compares generations and takes the newer
/// one ([`JobMasker::refresh`]).
#[derive(Clone)]
pub(super) struct JobMasker {
    inner: Arc<Mutex<(u64, SecretMasker)>>,
}

impl JobMasker {
    pub(super) fn new(masker: SecretMasker) -> Self {
        JobMasker {
            inner: Arc::new(Mutex::new((0, masker))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, SecretMasker)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of the masker as it is now.
    pub(super) fn current(&self) -> SecretMasker {
        self.lock().1.clone()
    }

    /// The current masker and its generation, for [`JobMasker::refresh`].
    pub(super) fn snapshot(&self) -> (u64, SecretMasker) {
        self.lock().clone()
    }

    /// `text` masked with every secret known so far.
    pub(super) fn mask<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        self.current().mask(text)
    }

    /// Adds a secret value for the rest of the job.
    pub(super) fn add(&self, value: &str) -> Result<(), MaskerError> {
        let mut guard = self.lock();
        let before = guard.1.clone();
        guard.1.add(value)?;
        if !before.is_same(&guard.1) {
            guard.0 += 1;
        }
        Ok(())
    }

    /// Gives `log` the current masker when it changed since generation `seen`.
    pub(super) fn refresh(&self, log: &mut StepLog, seen: &mut u64) {
        let guard = self.lock();
        if guard.0 != *seen {
            *seen = guard.0;
            log.set_masker(guard.1.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_log_takes_the_grown_masker_at_its_next_refresh_only() {
        let masker = JobMasker::new(SecretMasker::new());
        let (mut seen, snapshot) = masker.snapshot();
        let mut log = StepLog::new(snapshot, 1 << 20);
        // Nothing new: the log keeps its masker and the generation stays.
        masker.refresh(&mut log, &mut seen);
        assert_eq!(seen, 0);
        // A clone is the same job masker (the step loop and the runner's tasks share it).
        masker.clone().add("hunter2hunter2").unwrap();
        masker.refresh(&mut log, &mut seen);
        assert_eq!(seen, 1);
        let mut lines = Vec::new();
        log.push_bytes(b"password: hunter2hunter2\n", &mut lines);
        assert_eq!(lines, ["password: ***"]);
        assert_eq!(masker.mask("again hunter2hunter2"), "again ***");
        assert!(!masker.current().is_empty());
    }
}
