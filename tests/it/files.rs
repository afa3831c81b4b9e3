//! Every file under pipelines/ and deploy/ that siteflow reads loads, and the reference
//! configuration documents exactly the defaults.

use siteflow::config::Config;
use siteflow::inventory::Inventory;
use siteflow::readiness::Policy;
use siteflow::readiness::meetings::load_schedule;
use siteflow::source::simulator::Scenario;

use crate::support::repo;

#[test]
fn the_reference_configuration_is_the_defaults() {
    let mut loaded = Config::load(Some(&repo().join("deploy/siteflow.example.yaml"))).unwrap();
    assert!(loaded.inventory.sites_csv.take().is_some());
    assert!(loaded.pipeline.flows_sql.take().is_some());
    assert!(loaded.pipeline.probes_sql.take().is_some());
    assert!(loaded.pipeline.interfaces_sql.take().is_some());
    assert!(loaded.pipeline.top_talkers_sql.take().is_some());
    assert!(loaded.readiness.policy.take().is_some());
    assert_eq!(loaded, Config::default(), "deploy/siteflow.example.yaml drifted from the defaults");
}

#[test]
fn the_shipped_inventory_equals_the_built_in_one() {
    let shipped = Inventory::load(&repo().join("pipelines/hagiang/sites.csv")).unwrap();
    assert_eq!(shipped.sites(), Inventory::embedded().sites());
    assert_eq!(shipped.len(), 242);
}

#[test]
fn every_scenario_loads() {
    let inventory = Inventory::embedded();
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("pipelines/hagiang/scenarios")).unwrap() {
        let path = entry.unwrap().path();
        Scenario::load(&path, &inventory).unwrap_or_else(|e| panic!("{e}"));
        n += 1;
    }
    assert!(n >= 2);
}

#[test]
fn the_policy_and_meeting_schedule_load() {
    let inventory = Inventory::embedded();
    let policy = Policy::load(&repo().join("pipelines/hagiang/policy.yaml")).unwrap();
    assert_eq!(policy, Policy::default(), "policy.yaml spells out the built-in defaults");
    let meetings = load_schedule(&repo().join("pipelines/hagiang/meetings.yaml"), &inventory, &policy).unwrap();
    assert_eq!(meetings.len(), 2);
    assert_eq!(meetings[0].participants.len(), 3 + 22 + 193);
}

#[test]
fn the_maintenance_example_loads() {
    let inventory = Inventory::embedded();
    let windows = siteflow::readiness::maintenance::load(&repo().join("deploy/maintenance.example.yaml"), &inventory).unwrap();
    assert_eq!(windows.len(), 1);
    let below = inventory.select(None, None, inventory.by_id("meo-vac.ubnd"));
    assert_eq!(windows[0].sites.len(), below.len() + 1, "the office and every site below it");
}
