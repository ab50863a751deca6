//! A JUnit XML summary of runs (`lab run --junit FILE`), for CI systems that show test results:
//! a test suite per scenario and a test case per step run, a failed step as a failure with what
//! was expected and what was seen (quick-junit writes the XML).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use quick_junit::{NonSuccessKind, TestCase, TestCaseStatus, TestSuite};

use crate::runner::Report;

/// The summary of `reports`, as XML.
pub fn xml(reports: &[Report]) -> anyhow::Result<String> {
    let mut junit = quick_junit::Report::new("meshlab lab");
    for r in reports {
        let mut suite = TestSuite::new(r.scenario.as_str());
        suite.set_time(Duration::from_secs_f64(r.wall_ms / 1000.0));
        for step in &r.steps {
            let status = if step.ok {
                TestCaseStatus::success()
            } else {
                let mut failed = TestCaseStatus::non_success(NonSuccessKind::Failure);
                failed.set_message(step.detail.clone().unwrap_or_default());
                failed
            };
            let mut case = TestCase::new(format!("{:02} {} (line {})", step.index, step.action, step.line), status);
            case.set_classname(format!("{}.{}", r.backend, r.scenario));
            case.set_time(Duration::from_secs_f64(step.elapsed_ms / 1000.0));
            suite.add_test_case(case);
        }
        if let Some(f) = r.failure.as_ref().filter(|f| !r.steps.iter().any(|s| s.index == f.step && !s.ok)) {
            // A run stopped by its overall timeout: its last step never finished.
            let mut failed = TestCaseStatus::non_success(NonSuccessKind::Failure);
            failed.set_message(f.error.clone());
            suite.add_test_case(TestCase::new(format!("{:02} {} (line {})", f.step, f.action, f.line), failed));
        }
        junit.add_test_suite(suite);
    }
    junit.to_string().context("cannot write the JUnit summary")
}

/// Writes the summary of `reports` to `path`.
pub fn write(path: &Path, reports: &[Report]) -> anyhow::Result<()> {
    std::fs::write(path, xml(reports)?).with_context(|| format!("cannot write {}", path.display()))
}
