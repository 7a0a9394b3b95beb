# The sample app with Outrigger beside it on Nomad (docker driver, bridge networking: the tasks
# of a group share localhost, like containers of a pod).
#   nomad job run deploy/nomad/sample.nomad.hcl
# Order: `outrigger-install` copies the binary into the shared alloc dir and ends; `outrigger`
# (a prestart sidecar) runs for the allocation's life; the app starts behind `outrigger wait`,
# which holds it until the sidecar's /ready/outbound answers, since Nomad does not wait for a
# prestart sidecar to be healthy. Not run in CI (no Nomad here); see docs/kubernetes.md.
job "sample" {
  type = "service"

  group "sample" {
    count = 2

    network {
      mode = "bridge"
      port "http" {
        to = 8000 # Outrigger's inbound listener
      }
      port "admin" {
        to = 9901
      }
    }

    service {
      name = "sample"
      port = "http"
      check {
        type     = "http"
        port     = "admin"
        path     = "/ready" # the sidecar's readiness includes the app's probe
        interval = "5s"
        timeout  = "2s"
      }
    }

    task "outrigger-install" {
      driver = "docker"
      lifecycle {
        hook    = "prestart"
        sidecar = false
      }
      config {
        image = "ghcr.io/outrigger/outrigger:0.1.0"
        args  = ["install", "--to", "${NOMAD_ALLOC_DIR}/bin"]
      }
      resources {
        cpu    = 20
        memory = 16
      }
    }

    task "outrigger" {
      driver = "docker"
      lifecycle {
        hook    = "prestart"
        sidecar = true
      }
      config {
        image = "ghcr.io/outrigger/outrigger:0.1.0"
        args  = ["run", "-c", "${NOMAD_TASK_DIR}/outrigger.yaml"]
      }
      env {
        OUTRIGGER_SERVICE       = "sample"
        OUTRIGGER_ADMIN_ADDRESS = "0.0.0.0:9901" # Nomad's checks come from outside the group
      }
      template {
        destination = "local/outrigger.yaml"
        change_mode = "noop" # Outrigger watches its config and reloads it live
        data        = <<-EOT
          runtime:
            shutdown_grace: 30s
          app:
            address: 127.0.0.1:8080
            probe: { http: /healthz }
          listeners:
            - name: public
              address: 0.0.0.0:8000
          bridge: {}
        EOT
      }
      # runtime.shutdown_grace
      kill_timeout = "30s"
      resources {
        cpu    = 100
        memory = 128
      }
    }

    task "app" {
      driver = "docker"
      config {
        image   = "python:3.12-alpine"
        command = "${NOMAD_ALLOC_DIR}/bin/outrigger"
        args    = ["wait", "--", "python3", "-u", "${NOMAD_TASK_DIR}/app.py"]
      }
      env {
        PORT                    = "8080"
        OUTRIGGER_ADMIN_ADDRESS = "127.0.0.1:9901"
        DAPR_HTTP_PORT          = "3500"
        DAPR_GRPC_PORT          = "50001"
      }
      artifact {
        # Or a template with the app's source, or your own image.
        source      = "https://raw.githubusercontent.com/outrigger/outrigger/main/examples/app.py"
        destination = "local/"
      }
      kill_timeout = "20s"
      resources {
        cpu    = 200
        memory = 128
      }
    }
  }
}
