//! The Helm chart (`deploy/helm/courseview`), checked without a cluster:
//! `helm lint --strict`, renders with and without the KEDA and Prometheus
//! operator APIs, every rendered object validated offline against the
//! Kubernetes schemas (the oldest release the chart supports and the
//! newest) and the CRDs of those operators (`scripts/validate-k8s`), and
//! golden renders of the default and a production-like values file.
//! `COURSEVIEW_UPDATE_GOLDEN=1` rewrites the golden files after a change
//! the diff shows to be meant.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::peers::installed;

const APIS: &[&str] = &[
    "--api-versions",
    "keda.sh/v1alpha1",
    "--api-versions",
    "monitoring.coreos.com/v1",
];
/// Kinds rendered only where their API exists in the cluster.
const CUSTOM_KINDS: &[&str] = &["ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"];

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/courseview")
}

fn values(name: &str) -> String {
    chart().join("ci").join(name).display().to_string()
}

fn helm(args: &[&str]) -> Output {
    Command::new(installed("helm/current/helm"))
        .args(args)
        // No user's repositories, plugins or cache: the same answer everywhere.
        .env("HELM_CONFIG_HOME", std::env::temp_dir().join("courseview-helm/config"))
        .env("HELM_CACHE_HOME", std::env::temp_dir().join("courseview-helm/cache"))
        .env("HELM_DATA_HOME", std::env::temp_dir().join("courseview-helm/data"))
        .output()
        .expect("helm runs")
}

/// `helm template` of the chart with a values file, the operators' APIs
/// or not, and more arguments; the rendered YAML or helm's error.
fn render(values_file: &str, apis: bool, more: &[&str]) -> Result<String, String> {
    let chart = chart().display().to_string();
    let values_path = values(values_file);
    let mut args = vec![
        "template",
        "courseview",
        chart.as_str(),
        "--namespace",
        "courseview",
        "--kube-version",
        "1.37.0",
        "-f",
        values_path.as_str(),
    ];
    if apis {
        args.extend_from_slice(APIS);
    }
    args.extend_from_slice(more);
    let out = helm(&args);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("utf-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Kind and name of every rendered object. Helm writes each object as a
/// document of its own with its top-level keys at column 0, so the lines
/// say it without a YAML parser.
fn objects(rendered: &str) -> Vec<(String, String)> {
    rendered
        .split("\n---")
        .filter_map(|doc| {
            let kind = doc.lines().find_map(|l| l.strip_prefix("kind: "))?;
            let metadata = doc.lines().skip_while(|l| *l != "metadata:");
            let name = metadata.skip(1).find_map(|l| l.strip_prefix("  name: "))?;
            Some((kind.trim().to_owned(), name.trim().trim_matches('"').to_owned()))
        })
        .collect()
}

fn kinds(rendered: &str) -> Vec<String> {
    objects(rendered).into_iter().map(|(kind, _)| kind).collect()
}

/// A value of the repository's `.env` (the versions of the rig).
fn dot_env(key: &str) -> String {
    let env = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".env")).expect(".env");
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("{key} is not in .env"))
}

#[test]
fn the_chart_passes_helm_lint_strict_with_each_values_file() {
    let chart = chart().display().to_string();
    for file in ["default-values.yaml", "production-values.yaml"] {
        let path = values(file);
        let out = helm(&["lint", "--strict", &chart, "-f", &path]);
        assert!(
            out.status.success(),
            "helm lint --strict with {file}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn renders_match_their_golden_files() {
    let update = std::env::var_os("COURSEVIEW_UPDATE_GOLDEN").is_some();
    for (file, apis, golden) in [
        ("default-values.yaml", false, "default.yaml"),
        ("production-values.yaml", true, "production.yaml"),
        ("production-values.yaml", false, "production-without-operators.yaml"),
    ] {
        let rendered = render(file, apis, &[]).unwrap_or_else(|e| panic!("{file} renders: {e}"));
        let path = chart().join("ci/golden").join(golden);
        if update {
            std::fs::create_dir_all(path.parent().expect("dir")).expect("golden dir");
            std::fs::write(&path, &rendered).expect("golden written");
            continue;
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (COURSEVIEW_UPDATE_GOLDEN=1 writes it)", path.display()));
        if rendered != expected {
            let line = rendered
                .lines()
                .zip(expected.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| rendered.lines().count().min(expected.lines().count()));
            panic!(
                "{golden} differs from the render of {file} at line {}:\n  golden:   {:?}\n  rendered: {:?}\n\
                 (if the change is meant: COURSEVIEW_UPDATE_GOLDEN=1 cargo test --test it chart::)",
                line + 1,
                expected.lines().nth(line),
                rendered.lines().nth(line)
            );
        }
    }
}

#[test]
fn every_rendered_object_is_valid_for_kubernetes_and_the_operators_crds() {
    let dir = std::env::temp_dir().join(crate::helpers::unique("courseview-chart-"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut files = Vec::new();
    for (file, apis, more) in [
        ("default-values.yaml", false, &[][..]),
        ("default-values.yaml", true, &[][..]),
        (
            "production-values.yaml",
            true,
            &["--set", "rebuild.catalog=true", "--set", "producer.enabled=true"][..],
        ),
        ("production-values.yaml", false, &[][..]),
        (
            "production-values.yaml",
            true,
            &[
                "--set",
                "autoscaling.keda.enabled=false",
                "--set",
                "autoscaling.hpa.enabled=true",
            ][..],
        ),
    ] {
        let rendered = render(file, apis, more).unwrap_or_else(|e| panic!("{file} renders: {e}"));
        let path = dir.join(format!("{}.yaml", files.len()));
        std::fs::write(&path, rendered).expect("render written");
        files.push(path.display().to_string());
    }
    let out = Command::new(installed("kubernetes-validate/current/bin/python"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/validate-k8s"))
        .args(["--versions", &dot_env("KUBERNETES_VERSIONS")])
        .args(["--crds", &installed("crds/current").display().to_string()])
        .args(&files)
        .output()
        .expect("validate-k8s runs");
    assert!(
        out.status.success(),
        "rendered objects that Kubernetes or a CRD refuses:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn operator_objects_are_rendered_only_where_their_apis_exist() {
    let with = kinds(&render("production-values.yaml", true, &[]).expect("renders"));
    let without = kinds(&render("production-values.yaml", false, &[]).expect("renders"));
    for kind in CUSTOM_KINDS {
        assert!(!without.iter().any(|k| k == kind), "{kind} rendered without its API");
    }
    assert!(with.iter().any(|k| k == "ScaledObject"), "{with:?}");
    assert!(
        with.iter().any(|k| k == "ServiceMonitor" || k == "PodMonitor"),
        "{with:?}"
    );
    // One ScaledObject per worker Deployment, never one for the API.
    let objects = objects(&render("production-values.yaml", true, &[]).expect("renders"));
    let workers = objects
        .iter()
        .filter(|(kind, name)| kind == "Deployment" && name.contains("worker"))
        .count();
    let scaled = objects.iter().filter(|(kind, _)| kind == "ScaledObject").count();
    assert_eq!((workers, scaled), (2, 2), "{objects:?}");
}

#[test]
fn keda_and_a_plain_hpa_together_refuse_to_render() {
    let refused = render(
        "production-values.yaml",
        true,
        &["--set", "autoscaling.hpa.enabled=true"],
    )
    .expect_err("both autoscalers on must not render");
    assert!(
        refused.contains("keda") && refused.contains("hpa"),
        "the message names both: {refused}"
    );
}

#[test]
fn more_worker_replicas_than_partitions_refuse_to_render() {
    let refused = render(
        "production-values.yaml",
        true,
        &["--set", "autoscaling.keda.maxReplicaCount=1000"],
    )
    .expect_err("replicas beyond the partitions must not render");
    assert!(refused.contains("partitions"), "{refused}");
}

#[test]
fn a_wrong_value_fails_with_a_message_naming_it() {
    for (set, names) in [
        ("workers.catalog.replicaCount=-1", "replicaCount"),
        ("workers.catalog.replicaCount=many", "replicaCount"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("notAValue=1", "notAValue"),
    ] {
        let refused = render("default-values.yaml", false, &["--set", set]).expect_err("a wrong value must not render");
        assert!(refused.contains(names), "--set {set}: {refused}");
    }
}

#[test]
fn the_rebuild_job_is_rendered_only_when_asked() {
    let plain = objects(&render("default-values.yaml", false, &[]).expect("renders"));
    assert!(!plain.iter().any(|(kind, _)| kind == "Job"), "{plain:?}");
    let asked = render("default-values.yaml", false, &["--set", "rebuild.catalog=true"]).expect("renders");
    let jobs: Vec<_> = objects(&asked).into_iter().filter(|(kind, _)| kind == "Job").collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(
        asked.contains("- rebuild") && asked.contains("- catalog"),
        "the Job runs `rebuild catalog`: {asked}"
    );
}

#[test]
fn the_charts_dashboard_is_the_one_in_docs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = std::fs::read(root.join("docs/grafana/courseview.json")).expect("docs dashboard");
    let chart = std::fs::read(chart().join("dashboards/courseview.json")).expect("chart dashboard");
    assert!(
        docs == chart,
        "copy docs/grafana/courseview.json to deploy/helm/courseview/dashboards/"
    );
}

/// A misspelt variable is ignored by the binary, silently: every variable
/// the chart sets must be one that some `courseview` command reads (its
/// `--help` lists it), or a librdkafka property (`COURSEVIEW_KAFKA_X_*`).
#[test]
fn every_variable_the_chart_sets_is_one_courseview_reads() {
    let mut read = std::collections::BTreeSet::new();
    for command in ["project", "serve", "rebuild", "produce"] {
        let help = Command::new(env!("CARGO_BIN_EXE_courseview"))
            .args([command, "--help"])
            .output()
            .expect("courseview --help");
        let help = String::from_utf8(help.stdout).expect("utf-8");
        read.extend(
            help.split("[env: ")
                .skip(1)
                .filter_map(|s| s.split('=').next().map(str::to_owned)),
        );
    }
    assert!(read.contains("MONGODB_URI_FILE"), "{read:?}");
    let rendered = render(
        "production-values.yaml",
        true,
        &["--set", "rebuild.catalog=true", "--set", "producer.enabled=true"],
    )
    .expect("renders");
    let mut set = std::collections::BTreeSet::new();
    let mut in_configmap_data = false;
    for line in rendered.lines() {
        if let Some(name) = line.trim_start().strip_prefix("- name: ") {
            if name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                set.insert(name.to_owned());
            }
        }
        // The configuration ConfigMap's data keys are variables too (envFrom).
        if line == "data:" {
            in_configmap_data = true;
        } else if !line.starts_with("  ") {
            in_configmap_data = false;
        } else if in_configmap_data {
            if let Some((key, _)) = line.trim_start().split_once(':') {
                if key
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                {
                    set.insert(key.to_owned());
                }
            }
        }
    }
    assert!(set.contains("KAFKA_BROKERS"), "{set:?}");
    let unknown: Vec<_> = set
        .iter()
        .filter(|v| !read.contains(*v) && !v.starts_with("COURSEVIEW_KAFKA_X_"))
        .collect();
    assert!(unknown.is_empty(), "variables no courseview command reads: {unknown:?}");
}
