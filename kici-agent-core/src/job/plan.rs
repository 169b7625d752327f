//! The step plan of a job: its steps and parallel groups, numbered as the protocol counts them.

use crate::protocol::{StepEntry, StepSpec, StepType};

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
}
