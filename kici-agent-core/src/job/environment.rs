//! The job's base environment (what every step starts from) and the `job.context` report of it.

use super::JobRunner;
use crate::process::StepEnv;
use crate::protocol::{JobContextDetails, JobDispatch};
use crate::timeline::ContextFacts;

impl JobRunner {
    /// The `context` of the job's `job.context`.
    pub(super) fn job_context(
        &self,
        dispatch: &JobDispatch,
        workspace: &std::path::Path,
    ) -> JobContextDetails {
        let env = self.base_env(dispatch, workspace);
        let in_container = self
            .services
            .executors
            .container_image(&dispatch.job_config)
            .is_some();
        ContextFacts {
            env: &env,
            config: &dispatch.job_config,
            secret_names: dispatch
                .secrets
                .iter()
                .flat_map(|s| s.keys().cloned())
                .collect(),
            host_env: &self.services.settings.host_env,
            masker: &self.masker.current(),
            sandbox_type: if in_container {
                "container"
            } else {
                "bare-metal"
            },
            labels: &self.services.settings.labels,
            working_directory: workspace.display().to_string(),
            git_ref: &dispatch.git_ref,
        }
        .details()
    }

    pub(super) fn base_env(&self, dispatch: &JobDispatch, workspace: &std::path::Path) -> StepEnv {
        let config = &dispatch.job_config;
        let mut env = StepEnv::from_host(self.services.settings.host_env.clone());
        // Our documented extension, lowest precedence: the layers below may override it.
        env.set("KICI_RUN_ID", dispatch.run_id.clone());
        env.set("KICI_JOB_ID", dispatch.job_id.clone());
        env.set("KICI_JOB_NAME", config.name.clone());
        if let Some(workflow) = &config.workflow_name {
            env.set("KICI_WORKFLOW_NAME", workflow.clone());
        }
        env.set("KICI_REF", dispatch.git_ref.clone());
        env.set("KICI_SHA", dispatch.sha.clone());
        env.set("KICI_WORKSPACE", workspace.display().to_string());
        for layer in [&config.env, &config.environment_vars, &config.job_env]
            .into_iter()
            .flatten()
        {
            env.extend(layer.clone());
        }
        env
    }
}
