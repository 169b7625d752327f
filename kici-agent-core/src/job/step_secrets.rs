//! The secret outputs of one step attempt: masked as soon as they are seen, sealed into the
//! job's `secretOutputs` when the attempt ends.

use std::collections::{BTreeMap, HashSet};

use super::masker::JobMasker;
use super::JobRunner;
use crate::process::HandoffFiles;
use crate::secret_outputs::SecretOutputError;

/// The secret outputs one step attempt set, not sealed yet.
#[derive(Default)]
pub(super) struct SecretOutputs {
    /// By key, the last value winning.
    values: BTreeMap<String, String>,
    /// The first that cannot be sent for its own fault (an empty name).
    refused: Option<SecretOutputError>,
    /// Size of `$KICI_SECRET_OUTPUT` when last read.
    file_len: u64,
    /// Values already given to the masker (a short value would be counted again).
    masked: HashSet<String>,
}

impl SecretOutputs {
    /// Takes one secret output; its value is masked in the job's logs from now on.
    pub(super) fn push(&mut self, key: String, value: String, masker: &JobMasker) {
        self.mask(&value, masker);
        match crate::secret_outputs::check_key(&key) {
            Ok(()) => {
                self.values.insert(key, value);
            }
            Err(refusal) => {
                self.refused.get_or_insert(refusal);
            }
        }
    }

    /// Masks the values the step wrote to `$KICI_SECRET_OUTPUT` so far (the file is read
    /// again only when it grew or shrank); they are collected at the end of the step.
    pub(super) fn watch_file(&mut self, handoff: &HandoffFiles, masker: &JobMasker) {
        let len = std::fs::metadata(handoff.secret_output_file()).map_or(0, |m| m.len());
        if len == self.file_len {
            return;
        }
        self.file_len = len;
        if let Ok(values) = handoff.read_secret_outputs() {
            for (_, value) in values {
                self.mask(&value, masker);
            }
        }
    }

    fn mask(&mut self, value: &str, masker: &JobMasker) {
        if !self.masked.insert(value.to_owned()) {
            return;
        }
        if let Err(e) = masker.add(value) {
            tracing::error!(error = %e, "a secret output's value cannot be masked");
        }
    }
}

impl JobRunner {
    /// Seals a step's secret outputs into the job's; returns why they cannot be sent, if so.
    pub(super) fn seal_secret_outputs(&self, outputs: SecretOutputs) -> Option<SecretOutputError> {
        let sealer = match &self.sealer {
            Ok(sealer) => sealer,
            Err(reason) => {
                return outputs
                    .values
                    .into_iter()
                    .next()
                    .map(|(key, _)| SecretOutputError::NoRunKey {
                        key,
                        reason: reason.clone(),
                    })
                    .or(outputs.refused)
            }
        };
        if !outputs.values.is_empty() {
            let mut run_state = self.lock();
            for (key, value) in outputs.values {
                run_state.secret_outputs.insert(key, sealer.seal(&value));
            }
        }
        outputs.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::SecretMasker;

    #[test]
    fn every_value_is_masked_at_once_the_last_wins_a_key_and_the_first_refusal_is_kept() {
        let masker = JobMasker::new(SecretMasker::new());
        let mut outputs = SecretOutputs::default();
        outputs.push("TOKEN".into(), "first-value-1".into(), &masker);
        outputs.push("TOKEN".into(), "second-value-2".into(), &masker);
        outputs.push(" ".into(), "nameless-value".into(), &masker);
        outputs.push(String::new(), "another-nameless".into(), &masker);
        assert_eq!(
            outputs.values,
            BTreeMap::from([("TOKEN".to_owned(), "second-value-2".to_owned())])
        );
        assert_eq!(outputs.refused, Some(SecretOutputError::EmptyName));
        assert_eq!(
            masker.mask("first-value-1 second-value-2 nameless-value another-nameless"),
            "*** *** *** ***"
        );
    }

    #[test]
    fn values_written_to_the_secret_output_file_are_masked_before_the_step_ends() {
        let handoff = HandoffFiles::create(None).unwrap();
        let masker = JobMasker::new(SecretMasker::new());
        let mut outputs = SecretOutputs::default();
        outputs.watch_file(&handoff, &masker);
        assert!(masker.current().is_empty());
        std::fs::write(
            handoff.secret_output_file(),
            "DEPLOY_KEY=written-secret-1\n",
        )
        .unwrap();
        outputs.watch_file(&handoff, &masker);
        assert_eq!(masker.mask("key: written-secret-1"), "key: ***");
        // Collected from the file only at the end of the step (with `$KICI_ENV` and the rest).
        assert!(outputs.values.is_empty());
    }
}
