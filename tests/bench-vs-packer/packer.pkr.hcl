# Packer's side of scripts/bench-vs-packer (Debian's packer 1.6.6, qemu builder).
# The VM gets what kiln's gets (memory, CPUs, TCG, q35, virtio) and no network:
# restrict=on, the SSH communicator's hostfwd on loopback, and one guestfwd,
# 10.0.2.100:80, to the bench's loopback HTTP server, which serves the NoCloud
# seed (ds=nocloud-net in the SMBIOS serial) and the .deb.

variable "base_image" { type = string }
variable "output_dir" { type = string }
variable "ssh_private_key_file" { type = string }
variable "serve_port" { type = string }
variable "deb_url" { type = string }
variable "script" { type = string }
variable "console_log" { type = string }
variable "memory_mib" { type = string }
variable "cpus" { type = string }

source "qemu" "bench" {
  iso_url          = var.base_image
  iso_checksum     = "none"
  disk_image       = true
  use_backing_file = false
  skip_resize_disk = true
  format           = "qcow2"
  output_directory = var.output_dir
  vm_name          = "disk.qcow2"

  accelerator  = "tcg"
  machine_type = "q35"
  memory       = var.memory_mib
  cpus         = var.cpus
  headless     = true

  qemuargs = [
    # Replaces Packer's default -netdev (user,id=user.0,hostfwd=...): nothing
    # leaves the VM but the guestfwd; the hostfwd listens on loopback only.
    ["-netdev", "user,id=user.0,restrict=on,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22,guestfwd=tcp:10.0.2.100:80-cmd:busybox nc 127.0.0.1 ${var.serve_port}"],
    # Replaces the default -device list (with disk_interface virtio it is only the NIC).
    ["-device", "virtio-net,netdev=user.0"],
    ["-smbios", "type=1,serial=ds=nocloud-net;s=http://10.0.2.100/seed/"],
    ["-serial", "file:${var.console_log}"],
  ]

  communicator         = "ssh"
  ssh_username         = "packer"
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "15m"
  shutdown_command     = "sudo shutdown -P now"
  shutdown_timeout     = "5m"
}

build {
  sources = ["source.qemu.bench"]

  provisioner "shell" {
    script           = var.script
    environment_vars = ["DEB_URL=${var.deb_url}"]
    execute_command  = "chmod +x {{ .Path }}; sudo {{ .Vars }} {{ .Path }}"
  }
}
