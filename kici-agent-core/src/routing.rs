//! Executor routing: which executor runs a job, or each of its steps. The one rule for every
//! embedder (Rust, C, Python and the binary), applied by [`ExecutorRegistry`] and documented
//! there (it is public API; this module is not).

use std::collections::HashMap;
use std::sync::Arc;

use crate::container::ContainerExecutor;
use crate::executor::Executor;
use crate::protocol::{JobConfig, StepEntry, StepSpec};
use crate::typescript::TypeScriptExecutor;

/// The executors of an agent: the host's, registered by step name, job name or as the
/// default, and the agent's built-ins.
///
/// The host registers executors for a step name, a job name (`jobConfig.name`) or as the
/// default, on the registry or on [`crate::Agent`] before it starts; the agent adds its
/// built-ins (container engine, TypeScript runner, shell / process executor) when it starts.
///
/// **A job** runs as a whole through the TypeScript runner when its source file
/// (`jobConfig.source.file`) ends in `.ts`, it names no container image, none of its steps has a
/// `run` command, and nothing else claims it: no host executor is registered for the job or for
/// any of its steps, there is no host default, and the operator did not choose a step map
/// (`KICI_STEP_MAP`) or a process executor (`KICI_PROCESS_EXECUTOR`) for every step. Without
/// Node >= 20.6 such a job fails with an error naming the missing piece. Every other job runs
/// through the agent's step loop.
///
/// **A step** of the step loop runs with the first of:
///
/// 1. the host executor registered for its step name;
/// 2. the host executor registered for its job name;
/// 3. the container executor, when the job names a container image (`jobConfig.container`, or
///    the default image in container execution mode): every step runs in the job's container;
/// 4. the host default executor;
/// 5. the built-in executor: the process executor, else the shell executor (the step's `run`
///    command, else the step map's).
///
/// A host executor registered for a step or job wins over the job's container: registering it
/// is the most specific thing the embedder said about that step (hardware-in-the-loop steps of
/// a job whose other steps build in a container, say), while the image is a property of the
/// whole workflow. The step then runs on the host, and the job's log says so, so nothing is
/// overridden silently. The host default, in contrast, is a catch-all and does not take steps
/// out of a container.
///
/// A job with an image fails, with the reason, when the agent has no container executor (no
/// usable `DOCKER_HOST`, or a build without the cargo feature `container`) and host executors
/// registered for the job or for each of its steps do not take every step.
#[derive(Clone, Default)]
pub struct ExecutorRegistry {
    by_step: HashMap<String, Arc<dyn Executor>>,
    by_job: HashMap<String, Arc<dyn Executor>>,
    default: Option<Arc<dyn Executor>>,
    builtins: Builtins,
}

/// What the agent adds to the host's executors when it starts.
#[derive(Clone, Default)]
pub(crate) struct Builtins {
    /// The shell or process executor.
    pub executor: Option<Arc<dyn Executor>>,
    /// The operator chose `executor` for every step (a step map or a process executor), so it
    /// claims TypeScript jobs like a host default does.
    pub chosen_by_operator: bool,
    /// Runs every step of container jobs; `None`: no usable engine address, or a build without
    /// the cargo feature `container`.
    pub container: Option<Arc<ContainerExecutor>>,
    /// The image of jobs that name none (container execution mode only).
    pub default_image: Option<String>,
    /// Runs TypeScript jobs nothing else claims.
    pub typescript: Option<Arc<TypeScriptExecutor>>,
}

/// How the engine runs one job.
pub(crate) enum JobRoute {
    /// The engine's step loop; [`ExecutorRegistry::step_executor`] picks each step's executor.
    Steps {
        /// The job's container image, if it names one.
        image: Option<String>,
    },
    /// The TypeScript runner runs every step of the job itself.
    TypeScript(Arc<TypeScriptExecutor>),
}

/// Which rule picked a step's executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The host executor registered for the step name.
    Step,
    /// The host executor registered for the job name.
    Job,
    /// The job's container.
    Container,
    /// The host default.
    Default,
    /// The agent's shell or process executor.
    Builtin,
}

impl Claim {
    /// What a job log line calls the rule.
    pub fn describe(self) -> &'static str {
        match self {
            Claim::Step => "registered for the step",
            Claim::Job => "registered for the job",
            Claim::Container => "the job's container",
            Claim::Default => "the default",
            Claim::Builtin => "the built-in executor",
        }
    }
}

/// The executor picked for one step, and the rule that picked it.
pub(crate) struct StepExecutor {
    pub executor: Arc<dyn Executor>,
    pub claim: Claim,
}

impl ExecutorRegistry {
    /// An empty registry: the agent's built-ins run every step.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs steps named `step` with `executor` (replacing an earlier registration).
    pub fn for_step(&mut self, step: impl Into<String>, executor: Arc<dyn Executor>) -> &mut Self {
        self.by_step.insert(step.into(), executor);
        self
    }

    /// Runs the steps of jobs named `job` with `executor` (replacing an earlier registration).
    pub fn for_job(&mut self, job: impl Into<String>, executor: Arc<dyn Executor>) -> &mut Self {
        self.by_job.insert(job.into(), executor);
        self
    }

    /// Runs the steps no other rule takes with `executor` (see the rule on [`ExecutorRegistry`]).
    pub fn set_default(&mut self, executor: Arc<dyn Executor>) -> &mut Self {
        self.default = Some(executor);
        self
    }

    /// This registry with the agent's built-ins.
    pub(crate) fn with_builtins(mut self, builtins: Builtins) -> Self {
        self.builtins = builtins;
        self
    }

    /// The container executor, if the agent has a container engine.
    pub(crate) fn container(&self) -> Option<&Arc<ContainerExecutor>> {
        self.builtins.container.as_ref()
    }

    /// The container image job `config` runs in, if any.
    pub(crate) fn container_image(&self, config: &JobConfig) -> Option<String> {
        crate::container::image_for(config, self.builtins.default_image.as_deref())
    }

    /// How job `config` runs. `Err` (the job's error) when it needs a container engine the
    /// agent does not have.
    pub(crate) fn route_job(&self, config: &JobConfig) -> Result<JobRoute, String> {
        let image = self.container_image(config);
        let steps = flat_steps(&config.steps);
        if let Some(image) = &image {
            let all_on_host = self.by_job.contains_key(&config.name)
                || steps
                    .iter()
                    .all(|step| self.by_step.contains_key(&step.name));
            if self.builtins.container.is_none() && !all_on_host {
                return Err(format!(
                    "the job asks for container image {image}, but {}",
                    crate::container::NO_EXECUTOR
                ));
            }
        }
        let claimed = self.default.is_some()
            || self.builtins.chosen_by_operator
            || self.by_job.contains_key(&config.name)
            || steps
                .iter()
                .any(|step| self.by_step.contains_key(&step.name));
        let has_commands = steps.iter().any(|step| step.run.is_some());
        match &self.builtins.typescript {
            Some(typescript)
                if image.is_none() && !claimed && !has_commands && is_typescript_job(config) =>
            {
                Ok(JobRoute::TypeScript(typescript.clone()))
            }
            _ => Ok(JobRoute::Steps { image }),
        }
    }

    /// The executor of step `step` of job `job` in the step loop (`in_container`: the job names
    /// a container image). `None` when nothing can run it.
    pub(crate) fn step_executor(
        &self,
        job: &str,
        in_container: bool,
        step: &str,
    ) -> Option<StepExecutor> {
        let container = self
            .builtins
            .container
            .clone()
            .filter(|_| in_container)
            .map(|container| container as Arc<dyn Executor>);
        [
            (self.by_step.get(step).cloned(), Claim::Step),
            (self.by_job.get(job).cloned(), Claim::Job),
            (container, Claim::Container),
            (self.default.clone(), Claim::Default),
            (self.builtins.executor.clone(), Claim::Builtin),
        ]
        .into_iter()
        .find_map(|(executor, claim)| executor.map(|executor| StepExecutor { executor, claim }))
    }
}

/// Whether `config` is a job of a KiCI TypeScript workflow (`jobConfig.source.file` ends in `.ts`).
fn is_typescript_job(config: &JobConfig) -> bool {
    config
        .extra
        .get("source")
        .and_then(|source| source.get("file"))
        .and_then(serde_json::Value::as_str)
        .is_some_and(|file| file.ends_with(".ts"))
}

/// The steps of `jobConfig.steps` in index order (parallel children inline).
pub(crate) fn flat_steps(entries: &[StepEntry]) -> Vec<&StepSpec> {
    entries
        .iter()
        .flat_map(|entry| match entry {
            StepEntry::Step(step) => std::slice::from_ref(step).iter(),
            StepEntry::Parallel(group) => group.children.iter(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::ContainerSettings;
    use crate::executor::{JobContext, StepContext, StepIo, StepResult};
    use serde_json::json;
    use std::time::Duration;

    struct Named(&'static str);

    #[async_trait::async_trait]
    impl Executor for Named {
        fn name(&self) -> &str {
            self.0
        }
        async fn run_step(&self, _: &JobContext, _: &StepContext, _: StepIo) -> StepResult {
            Ok(())
        }
    }

    fn job(config: serde_json::Value) -> JobConfig {
        serde_json::from_value(config).unwrap()
    }

    fn typescript_job(name: &str, steps: &[&str]) -> JobConfig {
        job(json!({
            "name": name,
            "source": {"file": ".kici/workflows/ci.ts"},
            "steps": steps.iter().map(|s| json!({"name": s})).collect::<Vec<_>>(),
        }))
    }

    fn builtins(chosen_by_operator: bool) -> Builtins {
        Builtins {
            executor: Some(Arc::new(Named("shell"))),
            chosen_by_operator,
            // `None` in a build without the `container` feature.
            container: ContainerExecutor::new(ContainerSettings::new("unix:///nonexistent.sock"))
                .ok()
                .map(Arc::new),
            default_image: None,
            typescript: Some(Arc::new(TypeScriptExecutor::new(
                None,
                Duration::from_secs(1),
                Duration::from_secs(60),
            ))),
        }
    }

    /// `(executor name, rule)` of a step.
    fn picked(
        registry: &ExecutorRegistry,
        job: &str,
        in_container: bool,
        step: &str,
    ) -> (String, Claim) {
        let picked = registry.step_executor(job, in_container, step).unwrap();
        (picked.executor.name().to_owned(), picked.claim)
    }

    fn is_typescript(route: Result<JobRoute, String>) -> bool {
        matches!(route, Ok(JobRoute::TypeScript(_)))
    }

    #[test]
    #[cfg(feature = "container")]
    fn a_step_goes_to_step_then_job_then_container_then_default_then_builtin() {
        let mut registry = ExecutorRegistry::new();
        registry
            .set_default(Arc::new(Named("default")))
            .for_job("build", Arc::new(Named("job")))
            .for_step("flash", Arc::new(Named("step")));
        let registry = registry.with_builtins(builtins(false));
        assert_eq!(
            picked(&registry, "build", true, "flash"),
            ("step".into(), Claim::Step)
        );
        assert_eq!(
            picked(&registry, "build", true, "other"),
            ("job".into(), Claim::Job)
        );
        assert_eq!(
            picked(&registry, "test", true, "other"),
            ("container".into(), Claim::Container)
        );
        assert_eq!(
            picked(&registry, "test", false, "other"),
            ("default".into(), Claim::Default)
        );
        let only_builtins = ExecutorRegistry::new().with_builtins(builtins(false));
        assert_eq!(
            picked(&only_builtins, "test", false, "other"),
            ("shell".into(), Claim::Builtin)
        );
        assert!(ExecutorRegistry::new()
            .step_executor("test", false, "other")
            .is_none());
    }

    #[test]
    fn a_host_executor_registered_for_a_container_job_wins_over_the_container() {
        let mut registry = ExecutorRegistry::new();
        registry.for_job("hil", Arc::new(Named("python")));
        let registry = registry.with_builtins(builtins(false));
        let config =
            job(json!({"name": "hil", "container": "debian:12", "steps": [{"name": "x"}]}));
        match registry.route_job(&config) {
            Ok(JobRoute::Steps { image }) => assert_eq!(image.as_deref(), Some("debian:12")),
            _ => panic!("a container job runs through the step loop"),
        }
        assert_eq!(
            picked(&registry, "hil", true, "x"),
            ("python".into(), Claim::Job)
        );
    }

    #[test]
    #[cfg(feature = "container")]
    fn a_container_job_without_an_engine_fails_unless_host_executors_take_every_step() {
        let mut no_engine = builtins(false);
        no_engine.container = None;
        let mut registry = ExecutorRegistry::new();
        registry.for_step("flash", Arc::new(Named("step")));
        let registry = registry.with_builtins(no_engine);
        let config = |steps: serde_json::Value| {
            job(json!({"name": "b", "container": {"image": "debian:12"}, "steps": steps}))
        };
        let error = registry
            .route_job(&config(json!([{"name": "flash"}, {"name": "other"}])))
            .err()
            .unwrap();
        assert!(
            error.contains("debian:12") && error.contains("no container engine"),
            "{error}"
        );
        assert!(registry
            .route_job(&config(json!([{"name": "flash"}])))
            .is_ok());
    }

    /// Built without the `container` feature, the agent has no container executor: a job with
    /// an image (its own or the default one) fails naming the feature, unless host executors
    /// take all its steps.
    #[test]
    #[cfg(not(feature = "container"))]
    fn without_container_support_container_jobs_fail_naming_the_feature() {
        let no_support = builtins(false);
        assert!(no_support.container.is_none());
        let registry = ExecutorRegistry::new().with_builtins(no_support.clone());
        let named = job(json!({"name": "b", "container": "debian:12", "steps": [{"name": "x"}]}));
        let error = registry.route_job(&named).err().unwrap();
        assert!(
            error.contains("debian:12") && error.contains("cargo feature `container`"),
            "{error}"
        );

        let mut default_image = no_support.clone();
        default_image.default_image = Some("alpine:3".into());
        let registry = ExecutorRegistry::new().with_builtins(default_image);
        let unnamed = job(json!({"name": "b", "steps": [{"name": "x", "run": "true"}]}));
        let error = registry.route_job(&unnamed).err().unwrap();
        assert!(
            error.contains("alpine:3") && error.contains("cargo feature `container`"),
            "{error}"
        );

        // A host executor registered for the job still takes it, and runs its steps.
        let mut registry = ExecutorRegistry::new();
        registry.for_job("b", Arc::new(Named("python")));
        let registry = registry.with_builtins(no_support);
        assert!(matches!(
            registry.route_job(&named),
            Ok(JobRoute::Steps { image: Some(_) })
        ));
        assert_eq!(
            picked(&registry, "b", true, "x"),
            ("python".into(), Claim::Job)
        );
    }

    #[test]
    #[cfg(feature = "container")]
    fn the_default_image_applies_to_jobs_that_name_none() {
        let mut with_default_image = builtins(false);
        with_default_image.default_image = Some("alpine:3".into());
        let registry = ExecutorRegistry::new().with_builtins(with_default_image);
        let config = job(json!({"name": "b", "steps": [{"name": "x", "run": "true"}]}));
        assert_eq!(
            registry.container_image(&config).as_deref(),
            Some("alpine:3")
        );
        assert!(matches!(
            registry.route_job(&config),
            Ok(JobRoute::Steps { image: Some(_) })
        ));
    }

    #[test]
    fn a_typescript_job_goes_to_the_runner_unless_something_claims_it() {
        let config = typescript_job("build", &["compile", "test"]);
        // Step executors for other jobs' steps leave it to the runner (the Python and C case).
        let mut others = ExecutorRegistry::new();
        others
            .for_step("flash", Arc::new(Named("step")))
            .for_job("hil", Arc::new(Named("job")));
        assert!(is_typescript(
            others.with_builtins(builtins(false)).route_job(&config)
        ));

        let claims = |register: &dyn Fn(&mut ExecutorRegistry)| {
            let mut registry = ExecutorRegistry::new();
            register(&mut registry);
            !is_typescript(registry.with_builtins(builtins(false)).route_job(&config))
        };
        assert!(claims(&|r| {
            r.for_step("test", Arc::new(Named("step")));
        }));
        assert!(claims(&|r| {
            r.for_job("build", Arc::new(Named("job")));
        }));
        assert!(claims(&|r| {
            r.set_default(Arc::new(Named("default")));
        }));
        // An operator's step map or process executor claims it too.
        assert!(!is_typescript(
            ExecutorRegistry::new()
                .with_builtins(builtins(true))
                .route_job(&config)
        ));
    }

    #[test]
    fn typescript_jobs_with_commands_or_an_image_run_step_by_step() {
        let registry = ExecutorRegistry::new().with_builtins(builtins(false));
        let mut with_command = typescript_job("build", &["compile"]);
        with_command.steps = vec![StepEntry::Step(StepSpec {
            name: "compile".into(),
            run: Some("make".into()),
            ..StepSpec::default()
        })];
        assert!(!is_typescript(registry.route_job(&with_command)));
        let mut in_container = typescript_job("build", &["compile"]);
        in_container.container = Some(crate::protocol::ContainerSpec::Image("node:20".into()));
        assert!(!is_typescript(registry.route_job(&in_container)));
        let not_typescript = job(json!({"name": "build", "steps": [{"name": "compile"}]}));
        assert!(!is_typescript(registry.route_job(&not_typescript)));
    }

    #[test]
    fn flat_steps_inline_parallel_children_in_order() {
        let config = job(json!({"name": "j", "steps": [
            {"name": "a"},
            {"kind": "parallel", "name": "g", "children": [{"name": "b"}, {"name": "c"}]},
            {"name": "d"}
        ]}));
        let names: Vec<&str> = flat_steps(&config.steps)
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
    }
}
