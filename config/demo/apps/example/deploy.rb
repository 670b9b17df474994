set :application, "example"
# A local git repository: the DEMO_REPO task variable, or else the git repository that holds
# this configuration repository (pulsar-rest's runner says where it is in PULSAR_CONF_REPO).
conf = ENV.fetch("PULSAR_CONF_REPO", Dir.pwd)
set :repo_url, ENV.fetch("DEMO_REPO") { IO.popen(["git", "-C", conf, "rev-parse", "--show-toplevel"], &:read).strip }
set :branch, ENV.fetch("DEMO_BRANCH", "HEAD")
