# Settings shared by every app.
set :keep_releases, 3
set :log_level, :info
set :format_options, color: false, truncate: false
