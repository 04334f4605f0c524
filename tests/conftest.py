pytest_plugins = ["tests.consul_fixtures"]
