# Everything on this machine, through Capistrano's local backend.
set :sshkit_backend, SSHKit::Backend::Local
server "localhost", roles: %w[app web db]
set :deploy_to, File.join(ENV.fetch("DEMO_DEPLOY_ROOT", "/tmp/pulsar-demo"), "example", "staging")
