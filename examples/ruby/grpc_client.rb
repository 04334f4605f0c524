#!/usr/bin/env ruby
# frozen_string_literal: true

# A gRPC client of the Node "greeter" service (examples/node/greeter.proto),
# calling it by name through its own sidecar, with no mesh code: the target is
# the sidecar's outbound listener (MICRO_SIDECAR_OUTBOUND, which a supervising
# sidecar sets) and the service is named by the HTTP/2 :authority, set with the
# channel argument grpc.default_authority. The channel is plaintext HTTP/2; the
# sidecars talk mutual TLS to each other.
#
# It makes one unary call (SayHello) and one server-streaming call (SayHellos),
# prints each reply as a JSON line on stdout and exits 0. When a call fails it
# prints a JSON line with the gRPC status and exits with the status code (1-16);
# a usage error exits 64.
#
#   ruby grpc_client.rb                          # under its sidecar
#   ruby grpc_client.rb --target 127.0.0.1:15001 # the sidecar's outbound port
#   ruby grpc_client.rb --target 127.0.0.1:15201 --no-authority
#                                                # an --upstream greeter=15201 port
#
# Messages: Debian has no grpc_tools_ruby_protoc, so the two messages are
# described here by hand, as the FileDescriptorProto protoc would make of
# greeter.proto, and loaded with DescriptorPool#add_serialized_file (what
# protoc's own *_pb.rb files do since protobuf 3.23; it works with Debian's
# ruby-google-protobuf 3.21 and with the 4.x gems, which no longer have the
# older `build do add_message ... end` DSL). The service stub is the usual
# GRPC::GenericService one.

require "grpc"
require "google/protobuf"
require "google/protobuf/descriptor_pb"
require "json"
require "optparse"
require "uri"

module Greeter
  def self.file_descriptor
    field = lambda do |name, number, json_name|
      Google::Protobuf::FieldDescriptorProto.new(
        name: name, number: number, json_name: json_name,
        type: :TYPE_STRING, label: :LABEL_OPTIONAL
      )
    end
    Google::Protobuf::FileDescriptorProto.new(
      name: "greeter.proto",
      package: "greeter",
      syntax: "proto3",
      message_type: [
        Google::Protobuf::DescriptorProto.new(name: "HelloRequest", field: [field.call("name", 1, "name")]),
        Google::Protobuf::DescriptorProto.new(
          name: "HelloReply",
          field: [field.call("message", 1, "message"), field.call("served_by", 2, "servedBy")]
        )
      ]
    )
  end

  pool = Google::Protobuf::DescriptorPool.generated_pool
  pool.add_serialized_file(Google::Protobuf::FileDescriptorProto.encode(file_descriptor))
  HelloRequest = pool.lookup("greeter.HelloRequest").msgclass
  HelloReply = pool.lookup("greeter.HelloReply").msgclass

  module Greeter
    class Service
      include GRPC::GenericService

      self.marshal_class_method = :encode
      self.unmarshal_class_method = :decode
      self.service_name = "greeter.Greeter"

      rpc :SayHello, HelloRequest, HelloReply
      rpc :SayHellos, HelloRequest, stream(HelloReply)
    end

    Stub = Service.rpc_stub_class
  end
end

# Where to send the calls: --target, else the host:port of MICRO_SIDECAR_OUTBOUND.
def default_target
  outbound = ENV.fetch("MICRO_SIDECAR_OUTBOUND", "")
  return nil if outbound.empty?

  uri = URI(outbound)
  "#{uri.host}:#{uri.port}"
end

def parse_options(argv)
  options = { target: nil, authority: "greeter", name: "ruby", timeout: 10.0, request_id: nil }
  OptionParser.new do |o|
    o.banner = "usage: grpc_client.rb [--target HOST:PORT] [--authority NAME | --no-authority] [--name NAME]"
    o.on("--target HOST:PORT", "where to call (default: $MICRO_SIDECAR_OUTBOUND)") { |v| options[:target] = v }
    o.on("--authority NAME", "the service to call, sent as :authority (default: greeter)") do |v|
      options[:authority] = v
    end
    o.on("--no-authority", "send the target as :authority (an --upstream port names the service)") do
      options[:authority] = nil
    end
    o.on("--name NAME", "the name to greet (default: ruby)") { |v| options[:name] = v }
    o.on("--timeout SECONDS", Float, "deadline of each call (default: 10)") { |v| options[:timeout] = v }
    o.on("--request-id ID", "sent as x-request-id metadata") { |v| options[:request_id] = v }
  end.parse!(argv)
  options[:target] ||= default_target
  options
end

def reply_line(call, reply, extra = {})
  { call: call }.merge(extra).merge(message: reply.message, served_by: reply.served_by)
end

def main(argv)
  begin
    options = parse_options(argv)
  rescue OptionParser::ParseError => e
    warn "grpc_client: #{e.message}"
    return 64
  end
  unless options[:target]
    warn "grpc_client: no target: run under micro-sidecar (MICRO_SIDECAR_OUTBOUND) or pass --target HOST:PORT"
    return 64 # EX_USAGE, apart from the gRPC status codes
  end
  channel_args = {}
  channel_args["grpc.default_authority"] = options[:authority] if options[:authority]
  stub = Greeter::Greeter::Stub.new(options[:target], :this_channel_is_insecure, channel_args: channel_args)
  metadata = options[:request_id] ? { "x-request-id" => options[:request_id] } : {}
  request = Greeter::HelloRequest.new(name: options[:name])
  call = "SayHello"
  begin
    reply = stub.say_hello(request, deadline: Time.now + options[:timeout], metadata: metadata)
    puts JSON.generate(reply_line(call, reply))
    $stdout.flush

    call = "SayHellos"
    replies = stub.say_hellos(request, deadline: Time.now + options[:timeout], metadata: metadata)
    replies.each_with_index do |r, i|
      puts JSON.generate(reply_line(call, r, n: i + 1))
      $stdout.flush
    end
  rescue GRPC::BadStatus => e
    name = GRPC::Core::StatusCodes.constants.find { |c| GRPC::Core::StatusCodes.const_get(c) == e.code }
    puts JSON.generate(call: call, error: name.to_s, code: e.code, details: e.details)
    warn "grpc_client: #{call} to #{options[:authority] || options[:target]} failed: #{name} (#{e.code}): #{e.details}"
    return e.code.zero? ? 1 : e.code
  end
  0
end

exit(main(ARGV)) if $PROGRAM_NAME == __FILE__
