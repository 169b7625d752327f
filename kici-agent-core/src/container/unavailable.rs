//! The container executor of a build without the cargo feature `container`: no value of it can
//! exist. [`ContainerExecutor::new`] says why, so the agent has no container executor and
//! [`crate::routing`] fails the jobs that need one with that reason.

use std::convert::Infallible;

use super::{ContainerError, ContainerSettings};
use crate::executor::{Executor, JobContext, StepContext, StepIo, StepResult};

/// Runs every step of a job in one container of the job, in builds with the cargo feature
/// `container`. This build has none: [`ContainerExecutor::new`] always fails.
pub struct ContainerExecutor {
    /// Uninhabited: the methods below cannot be reached.
    never: Infallible,
}

impl ContainerExecutor {
    /// Fails with `ContainerError::NotBuilt`, naming the missing feature.
    pub fn new(_settings: ContainerSettings) -> Result<Self, ContainerError> {
        Err(ContainerError::NotBuilt)
    }

    /// Cannot be called: there is no executor in this build.
    pub async fn remove_all_sandboxes(&self) -> Result<usize, ContainerError> {
        match self.never {}
    }
}

#[async_trait::async_trait]
impl Executor for ContainerExecutor {
    fn name(&self) -> &str {
        match self.never {}
    }

    async fn run_step(&self, _job: &JobContext, _step: &StepContext, _io: StepIo) -> StepResult {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creating_one_names_the_missing_feature() {
        // `Result::err`: the `Ok` side is uninhabited here, which a pattern may not name
        // before Rust 1.82 (the crate's rust-version is lower).
        let error = ContainerExecutor::new(ContainerSettings::new("unix:///run/docker.sock"))
            .err()
            .expect("a build without the container feature has no container executor");
        let message = error.to_string();
        assert!(message.contains("cargo feature `container`"), "{message}");
    }

    #[test]
    fn container_execution_mode_stops_start_up_naming_the_feature() {
        let config = crate::AgentConfig::builder("ws://127.0.0.1:9/ws")
            .with_execution_mode(crate::config::ExecutionMode::Container)
            .build()
            .unwrap();
        let Err(error) = crate::Agent::new(config) else {
            panic!("an agent in container execution mode started without container support");
        };
        let message = error.to_string();
        assert!(message.contains("cargo feature `container`"), "{message}");
    }
}
