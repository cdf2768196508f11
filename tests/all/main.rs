//! kiln's integration tests, all in one binary so they build once.
//! Each test starts its own coordinator on loopback ports (see `kiln_tests::bed`).

mod access;
mod api_errors;
mod boot_hook;
mod builds;
mod cli;
mod confinement;
mod crash;
mod disk_full;
mod ec2;
mod ec2_bed;
mod ec2_identity;
mod enrollment;
mod janitor;
mod lifecycle;
mod limits;
mod openapi;
mod openstack;
mod openstack_bed;
mod qemu;
mod resilience;
mod secrets;
mod stock_image;
mod user_data;
mod vm_boundary;
mod web;
