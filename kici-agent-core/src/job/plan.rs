//! The step plan of a job: its steps and parallel groups, numbered as the protocol counts them,
//! and the rules that decide a step's retries, time limit and the end of each attempt. Pure:
//! the step loop (`run`, `attempt`) asks, this module decides.

use std::time::Duration;

use crate::executor::StepFailure;
use crate::protocol::{StepEntry, StepSpec, StepState, StepType};

/// A step's place in the flat step list (spec §5.3: children of a group take consecutive
/// indices; the group takes none).
#[derive(Clone)]
pub(super) struct PlannedStep {
    pub(super) index: u32,
    pub(super) spec: StepSpec,
}

impl PlannedStep {
    pub(super) fn step_ref<'a>(&'a self, group: Option<&'a str>) -> StepRef<'a> {
        StepRef {
            index: self.index,
            name: &self.spec.name,
            kind: StepType::Step,
            group,
        }
    }

    /// How many attempts the step gets: its retry policy's count, at least 1.
    pub(super) fn max_attempts(&self) -> u32 {
        self.spec.retry.as_ref().map_or(1, |r| r.max_attempts())
    }

    /// After failed attempt `attempt` (1-based): how long to wait before the next one, or
    /// `None` when there is no next one (no attempts left, or the step is being stopped).
    pub(super) fn retry_delay(&self, attempt: u32, stopping: bool) -> Option<Duration> {
        let retry = self.spec.retry.as_ref()?;
        (attempt < retry.max_attempts() && !stopping)
            .then(|| Duration::from_millis(retry.delay_after(attempt)))
    }

    /// The step's time limit: its own `timeout`, else the agent's `default`.
    pub(super) fn timeout(&self, default: Duration) -> Duration {
        self.spec.timeout.map_or(default, Duration::from_millis)
    }

    /// How an attempt ended, from what its executor returned and what interrupted it. An
    /// interruption decides over the executor's result, the job's timeout first (the step was
    /// aborted by it, whatever else happened), then a stop, then the step's own `timeout`.
    pub(super) fn verdict(
        &self,
        result: Result<(), StepFailure>,
        interrupted: Interruption,
        timeout: Duration,
    ) -> (StepState, Option<StepFailure>) {
        let name = &self.spec.name;
        if interrupted.job_timeout {
            let failure = StepFailure::new(format!("Step '{name}' aborted: job timeout exceeded"));
            return (StepState::Failed, Some(failure));
        }
        if interrupted.stopped {
            return (StepState::Cancelled, None);
        }
        if interrupted.step_timeout {
            let failure = StepFailure::new(format!(
                "Step '{name}' timed out after {}ms",
                timeout.as_millis()
            ));
            return (StepState::Failed, Some(failure));
        }
        match result {
            Ok(()) => (StepState::Success, None),
            Err(failure) => (StepState::Failed, Some(failure)),
        }
    }
}

/// What stopped a step attempt from outside its executor.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Interruption {
    /// The job's timeout ran out.
    pub(super) job_timeout: bool,
    /// The step was told to stop: a cancel, a shutdown, a failed fail-fast sibling.
    pub(super) stopped: bool,
    /// The step's own timeout ran out.
    pub(super) step_timeout: bool,
}

/// Which step (or hook pseudo-step) a `step.status` is about.
#[derive(Clone, Copy)]
pub(super) struct StepRef<'a> {
    pub(super) index: u32,
    pub(super) name: &'a str,
    pub(super) kind: StepType,
    /// The parallel group of a parallel child.
    pub(super) group: Option<&'a str>,
}

pub(super) enum Planned {
    Single(PlannedStep),
    Group {
        id: String,
        fail_fast: bool,
        max_parallel: Option<u32>,
        children: Vec<PlannedStep>,
    },
}

pub(super) fn plan_steps(entries: &[StepEntry]) -> Vec<Planned> {
    let mut index = 0u32;
    let mut groups = 0;
    let mut next = |spec: &StepSpec| {
        let step = PlannedStep {
            index,
            spec: spec.clone(),
        };
        index += 1;
        step
    };
    entries
        .iter()
        .map(|entry| match entry {
            StepEntry::Step(spec) => Planned::Single(next(spec)),
            StepEntry::Parallel(group) => {
                let id = format!("g{groups}");
                groups += 1;
                Planned::Group {
                    id,
                    fail_fast: group.fail_fast.unwrap_or(true),
                    max_parallel: group.max_parallel.filter(|m| *m > 0),
                    children: group.children.iter().map(&mut next).collect(),
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(steps: serde_json::Value) -> Vec<StepEntry> {
        serde_json::from_value(steps).unwrap()
    }

    /// `(index, name)` of a planned single step, or the group's id, flags and children.
    fn described(planned: &[Planned]) -> Vec<String> {
        planned
            .iter()
            .map(|p| match p {
                Planned::Single(step) => format!("{} {}", step.index, step.spec.name),
                Planned::Group {
                    id,
                    fail_fast,
                    max_parallel,
                    children,
                } => format!(
                    "{id} failFast={fail_fast} maxParallel={max_parallel:?} [{}]",
                    children
                        .iter()
                        .map(|c| format!("{} {}", c.index, c.spec.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
            .collect()
    }

    #[test]
    fn plan_steps_numbers_parallel_children_inline_and_groups_take_no_index() {
        let planned = plan_steps(&entries(serde_json::json!([
            {"name": "checkout"},
            {"kind": "parallel", "name": "checks", "children": [{"name": "lint"}, {"name": "unit"}]},
            {"name": "package"},
            {"kind": "parallel", "name": "deploy", "failFast": false, "maxParallel": 1,
             "children": [{"name": "eu"}, {"name": "us"}]}
        ])));
        assert_eq!(
            described(&planned),
            [
                "0 checkout",
                "g0 failFast=true maxParallel=None [1 lint, 2 unit]",
                "3 package",
                "g1 failFast=false maxParallel=Some(1) [4 eu, 5 us]",
            ]
        );
    }

    #[test]
    fn plan_steps_treats_max_parallel_zero_as_no_limit() {
        let planned = plan_steps(&entries(serde_json::json!([
            {"kind": "parallel", "name": "g", "maxParallel": 0, "children": [{"name": "a"}]}
        ])));
        assert_eq!(
            described(&planned),
            ["g0 failFast=true maxParallel=None [0 a]"]
        );
        assert!(plan_steps(&[]).is_empty());
    }

    #[test]
    fn a_planned_step_reports_as_a_step_of_its_group() {
        let planned = plan_steps(&entries(serde_json::json!([{"name": "a"}])));
        let Planned::Single(step) = &planned[0] else {
            panic!("a single step");
        };
        let reported = step.step_ref(Some("g3"));
        assert_eq!(
            (reported.index, reported.name, reported.kind, reported.group),
            (0, "a", StepType::Step, Some("g3"))
        );
    }

    fn step(spec: serde_json::Value) -> PlannedStep {
        PlannedStep {
            index: 0,
            spec: serde_json::from_value(spec).unwrap(),
        }
    }

    #[test]
    fn a_failed_attempt_is_retried_with_the_policys_delay_while_attempts_are_left() {
        let retried = step(serde_json::json!({"name": "flaky", "retry": {
            "maxAttempts": 3, "delayMs": 100, "backoff": "exponential"
        }}));
        assert_eq!(retried.max_attempts(), 3);
        assert_eq!(
            [1, 2, 3].map(|attempt| retried.retry_delay(attempt, false)),
            [
                Some(Duration::from_millis(100)),
                Some(Duration::from_millis(200)),
                None
            ]
        );
        // A stop (cancel, fail-fast sibling) ends the retries.
        assert_eq!(retried.retry_delay(1, true), None);
        // A bare count retries with the default delay (1 s, exponential).
        let counted = step(serde_json::json!({"name": "n", "retry": 2}));
        assert_eq!(
            (counted.max_attempts(), counted.retry_delay(1, false)),
            (2, Some(Duration::from_secs(1)))
        );
    }

    #[test]
    fn a_step_without_retries_gets_one_attempt() {
        for spec in [
            serde_json::json!({"name": "once"}),
            serde_json::json!({"name": "zero", "retry": 0}),
            serde_json::json!({"name": "one", "retry": {"maxAttempts": 1}}),
        ] {
            let once = step(spec);
            assert_eq!(once.max_attempts(), 1, "{}", once.spec.name);
            assert_eq!(once.retry_delay(1, false), None, "{}", once.spec.name);
        }
    }

    #[test]
    fn a_step_timeout_overrides_the_agents_default() {
        let default = Duration::from_secs(3600);
        let own = step(serde_json::json!({"name": "s", "timeout": 1500}));
        assert_eq!(own.timeout(default), Duration::from_millis(1500));
        assert_eq!(
            step(serde_json::json!({"name": "s"})).timeout(default),
            default
        );
    }

    #[test]
    fn an_interruption_decides_an_attempt_over_its_result_job_timeout_first() {
        let s = step(serde_json::json!({"name": "build"}));
        let limit = Duration::from_millis(250);
        let failed = || Err(StepFailure::exit_code(2));
        let verdict = |result, job_timeout, stopped, step_timeout| {
            let interrupted = Interruption {
                job_timeout,
                stopped,
                step_timeout,
            };
            let (state, failure) = s.verdict(result, interrupted, limit);
            (state, failure.map(|f| f.message))
        };
        let aborted = Some("Step 'build' aborted: job timeout exceeded".to_owned());
        let timed_out = Some("Step 'build' timed out after 250ms".to_owned());
        // Nothing interrupted it: the executor's result.
        assert_eq!(
            verdict(Ok(()), false, false, false),
            (StepState::Success, None)
        );
        assert_eq!(
            verdict(failed(), false, false, false),
            (
                StepState::Failed,
                Some("Command failed with exit code 2".to_owned())
            )
        );
        // The job's timeout: failed, even when the step succeeded or was stopped too.
        assert_eq!(
            verdict(Ok(()), true, true, true),
            (StepState::Failed, aborted)
        );
        // A stop: cancelled, whatever the executor said, even past the step's own timeout.
        assert_eq!(
            verdict(failed(), false, true, true),
            (StepState::Cancelled, None)
        );
        // The step's own timeout: failed with the limit, even when it succeeded at the end.
        assert_eq!(
            verdict(Ok(()), false, false, true),
            (StepState::Failed, timed_out)
        );
    }
}
