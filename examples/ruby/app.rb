# frozen_string_literal: true

# "fortune": a small Sinatra app that joins the mesh through micro-sidecar
# without any mesh code. Inbound requests arrive from the sidecar as plain
# HTTP; calls to other services go through the sidecar's outbound listener,
# whose address the sidecar passes in MICRO_SIDECAR_OUTBOUND.

require "json"
require "net/http"
require "uri"
require "sinatra/base"

class FortuneApp < Sinatra::Base
  SERVICE = "fortune"

  FORTUNES = [
    "A quiet sidecar is a happy sidecar.",
    "You will find a healthy instance when you least expect it.",
    "Every request id tells a story.",
    "The registry remembers what the heartbeat forgets.",
    "Drain first, then stop: your peers will thank you."
  ].freeze

  configure do
    set :show_exceptions, false
    set :raise_errors, false
    set :dump_errors, true
    # Requests come in through the sidecar with the mesh name in Host
    # (e.g. "fortune"); Sinatra 4 would refuse such hosts in development.
    set :host_authorization, { permitted_hosts: [] }
  end

  before do
    content_type :json
  end

  helpers do
    def request_id
      request.env["HTTP_X_REQUEST_ID"]
    end

    # The sidecar's outbound listener as [host, port], from
    # MICRO_SIDECAR_OUTBOUND (set by the sidecar in supervisor mode),
    # falling back to http_proxy / HTTP_PROXY.
    def outbound_proxy
      raw = ENV["MICRO_SIDECAR_OUTBOUND"] || ENV["http_proxy"] || ENV["HTTP_PROXY"]
      return nil if raw.nil? || raw.empty?

      uri = URI(raw)
      return nil unless uri.host && uri.port

      [uri.host, uri.port]
    rescue URI::InvalidURIError
      nil
    end
  end

  get "/health" do
    JSON.generate(status: "ok", service: SERVICE)
  end

  get "/fortune" do
    JSON.generate(
      service: SERVICE,
      fortune: FORTUNES.sample,
      requestId: request_id
    )
  end

  # Calls the Node "greeter" service through the sidecar, HTTP-proxy form:
  # the outbound listener is the proxy and the service name is the host, so
  # Net::HTTP sends "GET http://greeter/hello?name=fortune".
  get "/ask-node" do
    proxy = outbound_proxy
    if proxy.nil?
      halt 503, JSON.generate(
        error: "no_outbound",
        detail: "MICRO_SIDECAR_OUTBOUND is not set: run this app under micro-sidecar"
      )
    end

    http = Net::HTTP.new("greeter", 80, proxy[0], proxy[1])
    http.open_timeout = 2
    http.read_timeout = 5
    get = Net::HTTP::Get.new("/hello?name=fortune")
    get["Accept"] = "application/json"
    get["X-Request-Id"] = request_id if request_id
    begin
      answer = http.request(get)
    rescue StandardError => e
      halt 502, JSON.generate(error: "greeter_unreachable", detail: "#{e.class}: #{e.message}")
    end

    greeter = begin
      JSON.parse(answer.body.to_s)
    rescue JSON::ParserError
      answer.body.to_s
    end
    status(answer.code.to_i.between?(200, 299) ? 200 : 502)
    JSON.generate(
      service: SERVICE,
      requestId: request_id,
      fortune: { fortune: FORTUNES.sample },
      greeter: greeter,
      greeterStatus: answer.code.to_i
    )
  end

  # Answers after ?ms= milliseconds (default 1000, at most 60000): an
  # in-flight request for graceful-stop tests.
  get "/slow" do
    raw = params.fetch("ms", "1000")
    halt 400, JSON.generate(error: "bad_request", detail: "ms must be an integer") unless raw.match?(/\A\d+\z/)

    ms = [raw.to_i, 60_000].min
    sleep(ms / 1000.0)
    JSON.generate(service: SERVICE, sleptMs: ms)
  end

  not_found do
    JSON.generate(error: "not_found", path: request.path_info)
  end

  error do
    JSON.generate(error: "internal", detail: env["sinatra.error"].class.name)
  end
end
