namespace :demo do
  desc "Print progress for a few seconds"
  task :progress do
    on roles(:app) do
      steps = Integer(ENV.fetch("DEMO_STEPS", "5"))
      steps.times do |i|
        info "step #{i + 1} of #{steps} on #{fetch(:stage)}"
        sleep Float(ENV.fetch("DEMO_PAUSE", "0.5"))
      end
      info "all done"
    end
  end

  desc "Fail on purpose"
  task :fail do
    on roles(:app) do
      info "about to fail"
      execute :false
    end
  end

  desc "Print many numbered lines (DEMO_LINES, 100,000 by default): a big log"
  task :chatter do
    lines = Integer(ENV.fetch("DEMO_LINES", "100000"))
    lines.times { |i| $stdout.puts "line #{i + 1} of #{lines}: all is well" }
    $stdout.flush
  end

  desc "Run until stopped"
  task :hang do
    on roles(:app) do
      info "hanging"
      execute :sleep, "3600"
    end
  end
end
